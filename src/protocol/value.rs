//! The Python value model that task arguments, kwargs and results are decoded into.
//!
//! Pickle, kombu JSON and AMQP field tables all decode into [`Value`], so the
//! rest of the worker never sees a wire format. Only plain data is
//! representable: there is deliberately no variant for "an arbitrary Python
//! object", which is what makes the pickle decoder safe (see `pickle.rs`).
//! The one exception is [`Value::Object`], and it is data too: an instance of
//! one of the few [`DataClass`]es omega|ml's clients put in task messages,
//! kept as class name plus constructor arguments plus state.

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};

/// A plain Python value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`
    None,
    /// `bool`
    Bool(bool),
    /// `int` that fits in 64 bits.
    Int(i64),
    /// `int` outside 64 bits, as its decimal text.
    BigInt(String),
    /// `float`
    Float(f64),
    /// `str`
    Str(String),
    /// `bytes` / `bytearray`
    Bytes(Vec<u8>),
    /// `list`
    List(Vec<Value>),
    /// `tuple`
    Tuple(Vec<Value>),
    /// `set` / `frozenset`, in wire order.
    Set(Vec<Value>),
    /// `dict`, in insertion order; keys may be any hashable value.
    Dict(Vec<(Value, Value)>),
    /// `datetime.datetime`; `offset_seconds` is the UTC offset for aware values.
    DateTime {
        /// Wall-clock value as written by the sender.
        naive: NaiveDateTime,
        /// UTC offset in seconds, `None` for naive datetimes.
        offset_seconds: Option<i32>,
    },
    /// `datetime.date`
    Date(NaiveDate),
    /// `datetime.time` (naive)
    Time(NaiveTime),
    /// `datetime.timedelta`
    TimeDelta {
        /// days
        days: i64,
        /// seconds (0..86400)
        seconds: i64,
        /// microseconds (0..1_000_000)
        microseconds: i64,
    },
    /// `decimal.Decimal`, as its text.
    Decimal(String),
    /// `uuid.UUID`
    Uuid(uuid::Uuid),
    /// An instance of an allow-listed [`DataClass`], as data: its class
    /// name, what its constructor received and the state `BUILD` applied.
    ///
    /// Only the pickle decoder's explicit data-class allow-list (and
    /// [`super::typed_json`], which checks the same list) ever produces one.
    /// A consumer that needs the Python object rebuilds it from this data
    /// (`cls.__new__` + state, or `signature(dict)`), never by unpickling.
    /// Boxed so that the common variants keep [`Value`] small.
    Object(Box<DataObject>),
}

/// The Python classes whose instances may appear in a decoded value as a
/// [`Value::Object`]. Each is plain data in disguise, and each is accepted in
/// exactly one shape (see [`DataClass::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataClass {
    /// `omegaml.mixins.store.passthrough.PassthroughDataset`: a `str`
    /// subclass (the name `./system/passthrough/<uuid>`) whose instance
    /// `__dict__` carries small inline data (`{'_passthrough_data': [[1, 2]]}`)
    /// that `om.runtime.model(...).predict(data)` sends with the task.
    PassthroughDataset,
    /// `celery.canvas.signature`, the function every canvas class's
    /// `__reduce__` names (`Signature`, `chain`, `group`, `chord`, ... all
    /// pickle as `signature(dict(self))`), as found in a message's `embed`
    /// (`chain`, `callbacks`, `errbacks`, `chord`).
    CelerySignature,
    /// `builtins.range` (`xrange` in protocols 0–2): `range(start, stop,
    /// step)`, three ints, as `range.__reduce__` writes it; e.g. a
    /// gridsearch's `parameters={'n_neighbors': range(1, 8)}`.
    Range,
    /// `numpy.ndarray`, as numpy pickles it: `numpy.core.multiarray.
    /// _reconstruct(ndarray, (0,), b'b')` then `BUILD` with `(version,
    /// shape, dtype, is_fortran, raw)`, `raw` the bytes of the data (or a
    /// list of the items for an object array). Task results passed on as
    /// task arguments (a chord's reduce step gets the map steps' arrays).
    NdArray,
    /// `numpy.dtype(name, align, copy)` with its `BUILD` state tuple.
    NumpyDtype,
    /// A numpy scalar (`numpy.float64(2.5)`): `numpy.core.multiarray.
    /// scalar(dtype, raw bytes)`.
    NumpyScalar,
}

impl DataClass {
    /// Every data class.
    pub const ALL: [DataClass; 6] = [
        DataClass::PassthroughDataset,
        DataClass::CelerySignature,
        DataClass::Range,
        DataClass::NdArray,
        DataClass::NumpyDtype,
        DataClass::NumpyScalar,
    ];

    /// The full dotted `module.QualName`, as [`DataObject::class`] holds it.
    pub fn path(self) -> &'static str {
        match self {
            DataClass::PassthroughDataset => "omegaml.mixins.store.passthrough.PassthroughDataset",
            DataClass::CelerySignature => "celery.canvas.signature",
            DataClass::Range => "builtins.range",
            DataClass::NdArray => "numpy.ndarray",
            DataClass::NumpyDtype => "numpy.dtype",
            DataClass::NumpyScalar => "numpy.core.multiarray.scalar",
        }
    }

    /// The module and qualified name, as a pickle `GLOBAL` names them (for an
    /// array: the function that rebuilds it; numpy 2's `numpy._core` is read
    /// as `numpy.core`, which both numpy 1 and 2 load).
    pub fn module_and_name(self) -> (&'static str, &'static str) {
        match self {
            DataClass::PassthroughDataset => {
                ("omegaml.mixins.store.passthrough", "PassthroughDataset")
            }
            DataClass::CelerySignature => ("celery.canvas", "signature"),
            DataClass::Range => ("builtins", "range"),
            DataClass::NdArray => ("numpy.core.multiarray", "_reconstruct"),
            DataClass::NumpyDtype => ("numpy", "dtype"),
            DataClass::NumpyScalar => ("numpy.core.multiarray", "scalar"),
        }
    }

    /// The data class a full dotted path names, if any.
    pub fn from_path(path: &str) -> Option<DataClass> {
        Self::ALL.into_iter().find(|c| c.path() == path)
    }

    /// The data class a (normalized) pickle global names, if any.
    pub fn from_global(module: &str, name: &str) -> Option<DataClass> {
        Self::ALL
            .into_iter()
            .find(|c| c.module_and_name() == (module, name))
    }

    /// Python's `type(obj).__name__` for an instance (what error messages show).
    pub fn type_name(self) -> &'static str {
        match self {
            DataClass::PassthroughDataset => "PassthroughDataset",
            DataClass::CelerySignature => "Signature",
            DataClass::Range => "range",
            DataClass::NdArray => "ndarray",
            DataClass::NumpyDtype => "dtype",
            DataClass::NumpyScalar => "numpy scalar",
        }
    }

    /// The one accepted shape: a `PassthroughDataset` has exactly one `str`
    /// argument (its name) and a `dict` state or none; a `signature` has
    /// exactly one `dict` argument and no state; a `range` three `int`s and
    /// no state. Anything else is refused,
    /// because the consumer rebuilds the object from exactly these parts.
    pub fn check(self, args: &[Value], state: &Value) -> Result<(), ObjectShapeError> {
        let bad = |reason: &'static str| ObjectShapeError {
            class: self.path().to_owned(),
            reason,
        };
        match self {
            DataClass::PassthroughDataset => {
                if !matches!(args, [Value::Str(_)]) {
                    return Err(bad("expects exactly one str argument"));
                }
                if !matches!(state, Value::None | Value::Dict(_)) {
                    return Err(bad("state must be a dict or None"));
                }
            }
            DataClass::CelerySignature => {
                if !matches!(args, [Value::Dict(_)]) {
                    return Err(bad("expects exactly one dict argument"));
                }
                if !state.is_none() {
                    return Err(bad("takes no state"));
                }
            }
            DataClass::Range => {
                if !matches!(args, [Value::Int(_), Value::Int(_), Value::Int(step)] if *step != 0) {
                    return Err(bad("expects three int arguments (start, stop, step != 0)"));
                }
                if !state.is_none() {
                    return Err(bad("takes no state"));
                }
            }
            DataClass::NdArray => {
                if !args.is_empty() {
                    return Err(bad("takes no arguments (they are fixed)"));
                }
                let Value::Tuple(s) = state else {
                    return Err(bad("state must be (version, shape, dtype, fortran, data)"));
                };
                let ok = matches!(
                    s.as_slice(),
                    [Value::Int(_), Value::Tuple(shape), Value::Object(dtype), Value::Bool(_), Value::Bytes(_) | Value::List(_)]
                        if shape.iter().all(|d| matches!(d, Value::Int(n) if *n >= 0))
                            && dtype.data_class() == Ok(DataClass::NumpyDtype)
                );
                if !ok {
                    return Err(bad("state must be (version, shape, dtype, fortran, data)"));
                }
            }
            DataClass::NumpyDtype => {
                if !matches!(args, [Value::Str(_), Value::Bool(_), Value::Bool(_)]) {
                    return Err(bad("expects (name, align, copy)"));
                }
                if !matches!(state, Value::None | Value::Tuple(_)) {
                    return Err(bad("state must be a tuple or None"));
                }
            }
            DataClass::NumpyScalar => {
                let ok = matches!(args, [Value::Object(dtype), Value::Bytes(_)]
                    if dtype.data_class() == Ok(DataClass::NumpyDtype));
                if !ok {
                    return Err(bad("expects (dtype, bytes)"));
                }
                if !state.is_none() {
                    return Err(bad("takes no state"));
                }
            }
        }
        Ok(())
    }
}

/// A [`DataObject`] that is not one of the accepted [`DataClass`] shapes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class} {reason}")]
pub struct ObjectShapeError {
    /// The class path as given.
    pub class: String,
    /// What was wrong.
    pub reason: &'static str,
}

/// An instance of a [`DataClass`], as data (see [`Value::Object`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DataObject {
    /// Full dotted `module.QualName`, e.g. `celery.canvas.signature`.
    pub class: String,
    /// What the constructor received: `NEWOBJ`'s `cls.__new__(cls, *args)`
    /// arguments or `REDUCE`'s `callable(*args)` arguments.
    pub args: Vec<Value>,
    /// What `BUILD` applied (the instance `__dict__`), [`Value::None`] if nothing.
    pub state: Value,
}

impl DataObject {
    /// A data object of `class` (no check; see [`DataObject::data_class`]).
    pub fn new(class: DataClass, args: Vec<Value>, state: Value) -> Self {
        DataObject {
            class: class.path().to_owned(),
            args,
            state,
        }
    }

    /// The [`DataClass`] this object is a valid instance of, or why not.
    /// Encoders write the class's own pickle shape only when this succeeds.
    pub fn data_class(&self) -> Result<DataClass, ObjectShapeError> {
        let class = DataClass::from_path(&self.class).ok_or_else(|| ObjectShapeError {
            class: self.class.clone(),
            reason: "is not an allow-listed data class",
        })?;
        class.check(&self.args, &self.state)?;
        Ok(class)
    }

    /// The plain value Python's `json` (kombu's JSON encoder) and py-amqp
    /// see in this object: a `PassthroughDataset` is a `str` subclass, so its
    /// name (the inline data is lost, exactly as kombu loses it); a
    /// `Signature` is a `dict` subclass, so its dict. An object of any other
    /// shape (only ever built by hand) has no such view and shows as
    /// `{'class': ..., 'args': [...], 'state': ...}`, which never names a
    /// global a reader would import.
    pub fn plain(&self) -> std::borrow::Cow<'_, Value> {
        use std::borrow::Cow;
        match (self.data_class(), self.args.first()) {
            (Ok(DataClass::PassthroughDataset | DataClass::CelerySignature), Some(arg)) => {
                Cow::Borrowed(arg)
            }
            _ => Cow::Owned(Value::dict([
                ("class", Value::Str(self.class.clone())),
                ("args", Value::List(self.args.clone())),
                ("state", self.state.clone()),
            ])),
        }
    }
}

impl Value {
    /// The value as `&str` when it is a `str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as `i64` when it is an `int` that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The value as `f64` when it is an `int` or `float`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The elements when the value is a `list` or `tuple`.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// The items when the value is a `dict`.
    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// Looks up a `str` key in a `dict` value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// `true` for `None`.
    pub fn is_none(&self) -> bool {
        matches!(self, Value::None)
    }

    /// Builds a `dict` with `str` keys.
    pub fn dict<K: Into<String>>(items: impl IntoIterator<Item = (K, Value)>) -> Value {
        Value::Dict(
            items
                .into_iter()
                .map(|(k, v)| (Value::Str(k.into()), v))
                .collect(),
        )
    }

    /// Python type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "NoneType",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Set(_) => "set",
            Value::Dict(_) => "dict",
            Value::DateTime { .. } => "datetime",
            Value::Date(_) => "date",
            Value::Time(_) => "time",
            Value::TimeDelta { .. } => "timedelta",
            Value::Decimal(_) => "Decimal",
            Value::Uuid(_) => "UUID",
            Value::Object(o) => {
                DataClass::from_path(&o.class).map_or("object", DataClass::type_name)
            }
        }
    }
}

impl Value {
    /// Python's `repr()` of the value, for `argsrepr`/`kwargsrepr` in logs and
    /// events, where Python tools (Flower, `celery events`) show it verbatim.
    ///
    /// Follows CPython for the plain types: quote choice and escapes for
    /// `str`/`bytes`, shortest round-trip floats (`1e+16`, `1.0`, `inf`),
    /// `(1,)`, `set()`, and the `datetime` module's reprs. `str.isprintable`
    /// is approximated without Unicode tables (controls, separators, format
    /// and private-use characters are escaped); a frozenset shows as a set
    /// and a bytearray as bytes, because [`Value`] does not keep them apart.
    ///
    /// A [`Value::Object`] shows as the call that rebuilds it from its
    /// arguments, e.g. `PassthroughDataset('./system/passthrough/…')` or
    /// `signature({'task': …})`; the state (the passthrough data) is left
    /// out, as a log line needs the name, not a possibly large payload.
    pub fn repr(&self) -> String {
        let mut out = String::new();
        self.repr_into(&mut out);
        out
    }

    fn repr_into(&self, out: &mut String) {
        use std::fmt::Write as _;
        match self {
            Value::None => out.push_str("None"),
            Value::Bool(true) => out.push_str("True"),
            Value::Bool(false) => out.push_str("False"),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::BigInt(s) => out.push_str(s),
            Value::Float(f) => out.push_str(&float_repr(*f)),
            Value::Str(s) => str_repr(s, out),
            Value::Bytes(b) => bytes_repr(b, out),
            Value::List(items) => {
                out.push('[');
                repr_seq(items, out);
                out.push(']');
            }
            Value::Tuple(items) => {
                out.push('(');
                repr_seq(items, out);
                if items.len() == 1 {
                    out.push(',');
                }
                out.push(')');
            }
            Value::Set(items) if items.is_empty() => out.push_str("set()"),
            Value::Set(items) => {
                out.push('{');
                repr_seq(items, out);
                out.push('}');
            }
            Value::Dict(items) => {
                out.push('{');
                for (i, (k, v)) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    k.repr_into(out);
                    out.push_str(": ");
                    v.repr_into(out);
                }
                out.push('}');
            }
            Value::DateTime {
                naive,
                offset_seconds,
            } => {
                use chrono::{Datelike, Timelike};
                let mut fields = vec![
                    i64::from(naive.year()),
                    i64::from(naive.month()),
                    i64::from(naive.day()),
                    i64::from(naive.hour()),
                    i64::from(naive.minute()),
                    i64::from(naive.second()),
                    i64::from(naive.nanosecond() / 1000),
                ];
                // CPython drops a zero microsecond, then a zero second.
                for _ in 0..2 {
                    if fields.len() > 5 && fields.last() == Some(&0) {
                        fields.pop();
                    }
                }
                out.push_str("datetime.datetime(");
                out.push_str(&join_ints(&fields));
                if let Some(off) = offset_seconds {
                    out.push_str(", tzinfo=");
                    out.push_str(&timezone_repr(*off));
                }
                out.push(')');
            }
            Value::Date(d) => {
                use chrono::Datelike;
                let _ = write!(
                    out,
                    "datetime.date({}, {}, {})",
                    d.year(),
                    d.month(),
                    d.day()
                );
            }
            Value::Time(t) => {
                use chrono::Timelike;
                let us = t.nanosecond() / 1000;
                let _ = write!(out, "datetime.time({}, {}", t.hour(), t.minute());
                if us != 0 {
                    let _ = write!(out, ", {}, {}", t.second(), us);
                } else if t.second() != 0 {
                    let _ = write!(out, ", {}", t.second());
                }
                out.push(')');
            }
            Value::TimeDelta {
                days,
                seconds,
                microseconds,
            } => out.push_str(&timedelta_repr(*days, *seconds, *microseconds)),
            Value::Decimal(d) => {
                out.push_str("Decimal(");
                str_repr(d, out);
                out.push(')');
            }
            Value::Uuid(u) => {
                let _ = write!(out, "UUID('{}')", u.hyphenated());
            }
            Value::Object(o) => {
                let short = o.class.rsplit('.').next().unwrap_or(&o.class);
                out.push_str(short);
                out.push('(');
                match (o.data_class(), o.args.as_slice()) {
                    // Python leaves a step of 1 out: range(1, 8)
                    (Ok(DataClass::Range), [start, stop, Value::Int(1)]) => {
                        repr_seq(&[start.clone(), stop.clone()], out)
                    }
                    _ => repr_seq(&o.args, out),
                }
                out.push(')');
            }
        }
    }
}

fn repr_seq(items: &[Value], out: &mut String) {
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        v.repr_into(out);
    }
}

fn join_ints(v: &[i64]) -> String {
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn timedelta_repr(days: i64, seconds: i64, microseconds: i64) -> String {
    let mut parts = Vec::new();
    if days != 0 {
        parts.push(format!("days={days}"));
    }
    if seconds != 0 {
        parts.push(format!("seconds={seconds}"));
    }
    if microseconds != 0 {
        parts.push(format!("microseconds={microseconds}"));
    }
    if parts.is_empty() {
        "datetime.timedelta(0)".to_owned()
    } else {
        format!("datetime.timedelta({})", parts.join(", "))
    }
}

/// `repr(datetime.timezone(timedelta(seconds=off)))`; UTC has its own name.
fn timezone_repr(off: i32) -> String {
    if off == 0 {
        return "datetime.timezone.utc".to_owned();
    }
    let off = i64::from(off);
    format!(
        "datetime.timezone({})",
        timedelta_repr(off.div_euclid(86_400), off.rem_euclid(86_400), 0)
    )
}

/// CPython's `float.__repr__`: the shortest round-trip digits, in positional
/// notation when the decimal exponent is in `-4 <= e < 16`, else scientific
/// with a signed two-digit exponent.
pub(crate) fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    // Rust's `{:e}` gives the same shortest digits, e.g. "1.2345e-7", "-0e0".
    let sci = format!("{:e}", f);
    let (mant, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1; // position of the decimal point relative to the digits
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    if (-3..=16).contains(&decpt) {
        let n = digits.len() as i32;
        if decpt <= 0 {
            s.push_str("0.");
            s.push_str(&"0".repeat((-decpt) as usize));
            s.push_str(&digits);
        } else if decpt >= n {
            s.push_str(&digits);
            s.push_str(&"0".repeat((decpt - n) as usize));
            s.push_str(".0");
        } else {
            let (a, b) = digits.split_at(decpt as usize);
            s.push_str(a);
            s.push('.');
            s.push_str(b);
        }
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        s.push_str(first);
        if !rest.is_empty() {
            s.push('.');
            s.push_str(rest);
        }
        let sign = if exp < 0 { '-' } else { '+' };
        s.push_str(&format!("e{sign}{:02}", exp.unsigned_abs()));
    }
    s
}

/// An approximation of `str.isprintable()` for one character.
fn is_printable(c: char) -> bool {
    let cp = u32::from(c);
    if c == ' ' {
        return true;
    }
    if c.is_control() {
        return false;
    }
    !matches!(cp,
        // Zs (other than space), Zl, Zp
        0xA0 | 0x1680 | 0x2000..=0x200A | 0x2028 | 0x2029 | 0x202F | 0x205F | 0x3000
        // Cf
        | 0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x180E | 0x200B..=0x200F
        | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB
        | 0x110BD | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F
        // Co (private use) and noncharacters
        | 0xE000..=0xF8FF | 0xF0000..=0x10FFFF | 0xFFFE | 0xFFFF)
}

fn quote_for(has_single: bool, has_double: bool) -> char {
    if has_single && !has_double {
        '"'
    } else {
        '\''
    }
}

fn str_repr(s: &str, out: &mut String) {
    use std::fmt::Write as _;
    let q = quote_for(s.contains('\''), s.contains('"'));
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if is_printable(c) => out.push(c),
            c => {
                let cp = u32::from(c);
                let _ = if cp < 0x100 {
                    write!(out, "\\x{cp:02x}")
                } else if cp < 0x10000 {
                    write!(out, "\\u{cp:04x}")
                } else {
                    write!(out, "\\U{cp:08x}")
                };
            }
        }
    }
    out.push(q);
}

fn bytes_repr(b: &[u8], out: &mut String) {
    use std::fmt::Write as _;
    let q = quote_for(b.contains(&b'\''), b.contains(&b'"'));
    out.push('b');
    out.push(q);
    for &c in b {
        match c {
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            c if char::from(c) == q => {
                out.push('\\');
                out.push(char::from(c));
            }
            0x20..=0x7e => out.push(char::from(c)),
            c => {
                let _ = write!(out, "\\x{c:02x}");
            }
        }
    }
    out.push(q);
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, NaiveTime};

    #[test]
    fn float_repr_matches_python() {
        for (f, want) in [
            (1.0, "1.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (1e22, "1e+22"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
            (2.5, "2.5"),
            (12345.678, "12345.678"),
        ] {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn str_repr_matches_python() {
        assert_eq!(Value::from("a").repr(), "'a'");
        assert_eq!(Value::from("it's").repr(), "\"it's\"");
        assert_eq!(Value::from("'\"").repr(), r#"'\'"'"#);
        assert_eq!(
            Value::from("a\nb\t\\\x00\x7f\u{a0}é€😀").repr(),
            r"'a\nb\t\\\x00\x7f\xa0é€😀'"
        );
        assert_eq!(Value::from("\u{2028}").repr(), r"'\u2028'");
        assert_eq!(
            Value::Bytes(b"a'\x00\xff".to_vec()).repr(),
            r#"b"a'\x00\xff""#
        );
    }

    #[test]
    fn data_objects_repr_type_and_shape() {
        let pd = DataObject::new(
            DataClass::PassthroughDataset,
            vec![Value::from("./system/passthrough/0123")],
            Value::dict([("_passthrough_data", Value::List(vec![]))]),
        );
        let sig = DataObject::new(
            DataClass::CelerySignature,
            vec![Value::dict([("task", Value::from("t"))])],
            Value::None,
        );
        assert_eq!(
            Value::Object(Box::new(pd.clone())).repr(),
            "PassthroughDataset('./system/passthrough/0123')"
        );
        assert_eq!(
            Value::Object(Box::new(sig.clone())).repr(),
            "signature({'task': 't'})"
        );
        assert_eq!(
            Value::Object(Box::new(pd.clone())).type_name(),
            "PassthroughDataset"
        );
        assert_eq!(
            Value::Object(Box::new(sig.clone())).type_name(),
            "Signature"
        );
        assert_eq!(pd.data_class(), Ok(DataClass::PassthroughDataset));
        assert_eq!(sig.data_class(), Ok(DataClass::CelerySignature));
        assert_eq!(*pd.plain(), Value::from("./system/passthrough/0123"));
        assert_eq!(*sig.plain(), Value::dict([("task", Value::from("t"))]));
        for (class, args, state, why) in [
            (
                "os.system",
                vec![],
                Value::None,
                "os.system is not an allow-listed data class",
            ),
            (
                DataClass::PassthroughDataset.path(),
                vec![Value::Int(1)],
                Value::None,
                "expects exactly one str argument",
            ),
            (
                DataClass::PassthroughDataset.path(),
                vec![Value::from("n")],
                Value::List(vec![]),
                "state must be a dict or None",
            ),
            (
                DataClass::CelerySignature.path(),
                vec![Value::List(vec![])],
                Value::None,
                "expects exactly one dict argument",
            ),
            (
                DataClass::CelerySignature.path(),
                vec![Value::Dict(vec![])],
                Value::Dict(vec![]),
                "takes no state",
            ),
        ] {
            let o = DataObject {
                class: class.to_owned(),
                args,
                state,
            };
            let err = o.data_class().expect_err(class).to_string();
            assert!(err.contains(why), "{err}");
        }
        // Keeping Value small is why Object is boxed.
        assert!(std::mem::size_of::<Value>() <= 32);
    }

    #[test]
    fn containers_and_datetimes() {
        let naive = NaiveDate::from_ymd_opt(2024, 1, 2)
            .and_then(|d| d.and_hms_micro_opt(3, 4, 5, 678_901))
            .expect("valid");
        let v = Value::Tuple(vec![
            Value::Tuple(vec![Value::Int(1)]),
            Value::Set(vec![]),
            Value::Set(vec![Value::Int(1), Value::Int(2)]),
            Value::dict([("a", Value::Int(1))]),
            Value::DateTime {
                naive,
                offset_seconds: Some(0),
            },
        ]);
        assert_eq!(
            v.repr(),
            "((1,), set(), {1, 2}, {'a': 1}, datetime.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc))"
        );
        let midnight = NaiveDate::from_ymd_opt(2024, 1, 2)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("valid");
        assert_eq!(
            Value::DateTime { naive: midnight, offset_seconds: Some(-18_000) }.repr(),
            "datetime.datetime(2024, 1, 2, 0, 0, tzinfo=datetime.timezone(datetime.timedelta(days=-1, seconds=68400)))"
        );
        assert_eq!(
            Value::Time(NaiveTime::from_hms_opt(3, 4, 0).expect("valid")).repr(),
            "datetime.time(3, 4)"
        );
        assert_eq!(
            Value::TimeDelta {
                days: 0,
                seconds: 0,
                microseconds: 0
            }
            .repr(),
            "datetime.timedelta(0)"
        );
    }
}
