//! A safe, allow-list pickle decoder (protocols 0–5) and a small encoder.
//!
//! omega|ml's clients send task bodies and read results as pickle, so the
//! worker must read pickle. Python's own unpickler imports and calls whatever
//! a message names (`os.system`, `subprocess.Popen`, ...); this one has no
//! evaluator at all. It decodes into [`Value`] and understands exactly the
//! handful of `GLOBAL`/`REDUCE` patterns that CPython 3 emits for plain data
//! types (datetime, Decimal, UUID, set, bytes, OrderedDict). Any other global
//! is refused when it is *named*, before anything could use it, with an error
//! that names it (`forbidden pickle global 'posix.system'`), so an operator
//! can see what a client tried to send.
//!
//! A second, separate allow-list holds the *data classes* omega|ml's clients
//! put in task messages ([`DataClass`]): `PassthroughDataset` (inline data
//! for `om.runtime.model(...).predict(data)`) and `celery.canvas.signature`
//! (chain/link/chord entries in the `embed`). They decode to
//! [`Value::Object`] (class + arguments + state), each only in the shape
//! CPython writes for it:
//!
//! * `PassthroughDataset`: `NEWOBJ`/`NEWOBJ_EX` with exactly one `str`
//!   argument and no keyword arguments (protocols 2–5), or
//!   `copyreg._reconstructor(PassthroughDataset, str, <str>)` (protocols
//!   0–1); then optionally one `BUILD` with a `dict` state.
//! * `celery.canvas.signature`: `REDUCE` with exactly one `dict` argument.
//!   (`celery.canvas.Signature` itself is never written by CPython: every
//!   canvas class's `__reduce__` returns `signature, (dict(self),)`; so it
//!   stays forbidden.)
//!
//! Everything inside (the signature's dict, the dataset's state) is decoded
//! by the same rules and limits as any other content, so a forbidden global
//! nested in a signature is still refused.
//!
//! The decoder never panics and never allocates from a length it has not
//! checked against the bytes actually present; nesting, stack, memo, element
//! count and output size are bounded by [`Limits`].
//!
//! Objects are kept in an arena while decoding (stack and memo hold indices),
//! because pickle shares objects: a memoized list that is `APPEND`ed to later
//! must show the appended items wherever it was `GET`. The final tree is
//! materialized from the arena at `STOP`, with a budget, so shared references
//! cannot expand into an exponential output ("billion laughs").

use std::collections::HashMap;

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};

use super::value::{DataClass, DataObject, Value};

/// Bounds applied while decoding. The defaults are far above anything a
/// Celery message carries and far below what would hurt the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest container nesting in the result (same as JSON's limit).
    pub max_depth: usize,
    /// Most items on the unpickling stack at once.
    pub max_stack: usize,
    /// Most open `MARK`s at once (each nesting level uses at most one).
    pub max_marks: usize,
    /// Most memo entries.
    pub max_memo: usize,
    /// Most objects created while decoding, and most values in the result.
    pub max_elements: usize,
    /// Most bytes of `str`/`bytes` data in the result (shared references count each time).
    pub max_output_bytes: usize,
    /// Most bytes in one integer (`LONG1`/`LONG4`/text `LONG`): CPython's own
    /// `int` ↔ `str` conversion refuses more than 4300 digits by default.
    pub max_int_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: super::json::MAX_DEPTH,
            max_stack: 1_000_000,
            max_marks: 1024,
            max_memo: 1_000_000,
            max_elements: 1_000_000,
            max_output_bytes: 128 * 1024 * 1024,
            max_int_bytes: 4096,
        }
    }
}

/// Why a pickle could not be decoded. Every variant says precisely what and,
/// where it helps, the byte offset of the opcode involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PickleError {
    /// The data ended before `STOP` or inside an opcode's argument.
    #[error("pickle data was truncated (at offset {at})")]
    Truncated {
        /// Offset of the opcode whose argument is missing.
        at: usize,
    },
    /// A byte that is not a pickle opcode.
    #[error("invalid pickle opcode 0x{opcode:02x} at offset {at}")]
    BadOpcode {
        /// The byte.
        opcode: u8,
        /// Where.
        at: usize,
    },
    /// `PROTO` with a version this decoder (and CPython 3.11) does not know.
    #[error("unsupported pickle protocol {0}")]
    UnsupportedProtocol(u8),
    /// A global outside the allow-list. Never imported, never called.
    #[error("forbidden pickle global '{module}.{name}'")]
    ForbiddenGlobal {
        /// Module as written (Python 2 names mapped to Python 3 ones).
        module: String,
        /// Qualified name.
        name: String,
    },
    /// An opcode that needs something this decoder deliberately lacks
    /// (persistent ids, the copyreg extension registry, out-of-band buffers).
    #[error("unsupported pickle opcode {opcode} at offset {at}: {reason}")]
    Unsupported {
        /// Opcode name, e.g. `PERSID`.
        opcode: &'static str,
        /// Where.
        at: usize,
        /// Why it is refused.
        reason: &'static str,
    },
    /// An allow-listed callable applied to arguments CPython never emits for it.
    #[error("bad pickle call {callable} at offset {at}: {reason}")]
    BadCall {
        /// e.g. `datetime.datetime`.
        callable: String,
        /// Where (the REDUCE/NEWOBJ/BUILD/INST/OBJ opcode).
        at: usize,
        /// What was wrong.
        reason: String,
    },
    /// An opcode needed more stack items than there were (above the current MARK).
    #[error("pickle stack underflow at offset {at} ({opcode})")]
    StackUnderflow {
        /// Opcode name.
        opcode: &'static str,
        /// Where.
        at: usize,
    },
    /// An opcode that needs a MARK found none.
    #[error("pickle {opcode} at offset {at} without a MARK")]
    NoMark {
        /// Opcode name.
        opcode: &'static str,
        /// Where.
        at: usize,
    },
    /// `GET` of a memo index that was never `PUT`.
    #[error("pickle memo key {key} not found (at offset {at})")]
    MemoMissing {
        /// The key.
        key: u64,
        /// Where.
        at: usize,
    },
    /// An opcode applied to an object of the wrong type, or a malformed text argument.
    #[error("malformed pickle at offset {at}: {reason}")]
    Malformed {
        /// Where.
        at: usize,
        /// What was wrong.
        reason: String,
    },
    /// A string that is not valid UTF-8 (or not ASCII, for Python 2 `str`).
    #[error("invalid string data in pickle at offset {at}: {reason}")]
    BadString {
        /// Where.
        at: usize,
        /// Which encoding rule failed.
        reason: &'static str,
    },
    /// A container refers to itself; [`Value`] is a tree.
    #[error("recursive pickle structure (an object contains itself)")]
    Recursive,
    /// A [`Limits`] bound was hit.
    #[error("pickle exceeds limit: {0}")]
    Limit(&'static str),
}

/// A callable (or class) on the allow-list. Only these can be named by
/// `GLOBAL`/`STACK_GLOBAL`/`INST`; each accepts only the argument shapes CPython 3 emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    DateTime,
    Date,
    Time,
    TimeDelta,
    TimeZone,
    PytzUtc,
    Decimal,
    Uuid,
    Set,
    FrozenSet,
    ByteArray,
    Bytes,
    OrderedDict,
    CodecsEncode,
    Reconstructor,
    Object,
    /// `builtins.str`: only as `copyreg._reconstructor`'s base for a
    /// `PassthroughDataset` (protocols 0–1).
    Str,
    /// `numpy.ndarray`: only as `_reconstruct`'s first argument.
    NdArrayType,
    /// A data class (see [`DataClass`]): never called, only recorded.
    Data(DataClass),
}

impl Global {
    fn name(self) -> &'static str {
        match self {
            Global::DateTime => "datetime.datetime",
            Global::Date => "datetime.date",
            Global::Time => "datetime.time",
            Global::TimeDelta => "datetime.timedelta",
            Global::TimeZone => "datetime.timezone",
            Global::PytzUtc => "pytz._UTC",
            Global::Decimal => "decimal.Decimal",
            Global::Uuid => "uuid.UUID",
            Global::Set => "builtins.set",
            Global::FrozenSet => "builtins.frozenset",
            Global::ByteArray => "builtins.bytearray",
            Global::Bytes => "builtins.bytes",
            Global::OrderedDict => "collections.OrderedDict",
            Global::CodecsEncode => "_codecs.encode",
            Global::Reconstructor => "copyreg._reconstructor",
            Global::Object => "builtins.object",
            Global::Str => "builtins.str",
            Global::NdArrayType => "numpy.ndarray",
            Global::Data(DataClass::NdArray) => "numpy.core.multiarray._reconstruct",
            Global::Data(d) => d.path(),
        }
    }
}

/// Maps Python 2 module names (protocols 0–2 written by Python 3 use them,
/// as `_compat_pickle` does) so allow-listing and error messages use one spelling.
fn normalize_module(module: &str) -> &str {
    match module {
        "__builtin__" | "exceptions" => "builtins",
        "copy_reg" => "copyreg",
        "numpy._core.multiarray" => "numpy.core.multiarray",
        other => other,
    }
}

/// Maps Python 2 global names the same way (`_compat_pickle.NAME_MAPPING`),
/// after [`normalize_module`]: protocol 0 writes `__builtin__.unicode` for `str`.
fn normalize_name<'n>(module: &str, name: &'n str) -> &'n str {
    match (module, name) {
        ("builtins", "unicode") => "str",
        ("builtins", "xrange") => "range",
        (_, other) => other,
    }
}

/// What a global name resolves to: a callable, or a constant object.
fn resolve_global(module: &str, name: &str) -> Result<Node, PickleError> {
    let module = normalize_module(module);
    let name = normalize_name(module, name);
    if let Some(d) = DataClass::from_global(module, name) {
        return Ok(Node::Global(Global::Data(d)));
    }
    let g = match (module, name) {
        ("datetime", "datetime") => Global::DateTime,
        ("datetime", "date") => Global::Date,
        ("datetime", "time") => Global::Time,
        ("datetime", "timedelta") => Global::TimeDelta,
        ("datetime", "timezone") => Global::TimeZone,
        ("datetime", "timezone.utc") => return Ok(Node::TzInfo(0)),
        ("pytz", "_UTC") => Global::PytzUtc,
        ("decimal", "Decimal") => Global::Decimal,
        ("uuid", "UUID") => Global::Uuid,
        ("builtins", "set") => Global::Set,
        ("builtins", "frozenset") => Global::FrozenSet,
        ("builtins", "bytearray") => Global::ByteArray,
        ("builtins", "bytes") => Global::Bytes,
        ("builtins", "object") => Global::Object,
        ("builtins", "str") => Global::Str,
        ("numpy", "ndarray") => Global::NdArrayType,
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("_codecs", "encode") => Global::CodecsEncode,
        ("copyreg", "_reconstructor") => Global::Reconstructor,
        _ => {
            return Err(PickleError::ForbiddenGlobal {
                module: module.to_owned(),
                name: name.to_owned(),
            })
        }
    };
    Ok(Node::Global(g))
}

/// An object under construction. Containers hold arena indices.
#[derive(Debug, Clone)]
enum Node {
    /// A finished scalar (never a container).
    Leaf(Value),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Set(Vec<usize>),
    Global(Global),
    /// A `datetime.timezone` (or `pytz.utc`) instance: its UTC offset.
    TzInfo(i32),
    /// `uuid.UUID.__new__(UUID)`: waits for `BUILD` with `{'int': n}`.
    PendingUuid,
    /// An instance of a data class: its constructor arguments and, once
    /// `BUILD` ran, its state.
    Object {
        class: DataClass,
        args: Vec<usize>,
        state: Option<usize>,
    },
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::Leaf(v) => v.type_name(),
            Node::List(_) => "list",
            Node::Tuple(_) => "tuple",
            Node::Dict(_) => "dict",
            Node::Set(_) => "set",
            Node::Global(_) => "global",
            Node::TzInfo(_) => "timezone",
            Node::PendingUuid => "UUID (without state)",
            Node::Object { class, .. } => class.type_name(),
        }
    }
}

/// Decodes a pickle into a [`Value`] with the default [`Limits`].
pub fn decode(data: &[u8]) -> Result<Value, PickleError> {
    decode_with_limits(data, &Limits::default())
}

/// Decodes a pickle into a [`Value`]. Bytes after `STOP` are ignored, as
/// Python's `pickle.loads` ignores them.
pub fn decode_with_limits(data: &[u8], limits: &Limits) -> Result<Value, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        op_at: 0,
        limits,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = m.run()?;
    let mut budget = Budget {
        values: limits.max_elements,
        bytes: limits.max_output_bytes,
    };
    let mut visiting = vec![false; m.arena.len()];
    m.materialize(root, 0, &mut budget, &mut visiting)
}

struct Budget {
    values: usize,
    bytes: usize,
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed (for errors).
    op_at: usize,
    limits: &'a Limits,
    arena: Vec<Node>,
    stack: Vec<usize>,
    /// Stack lengths at each open MARK (CPython's metastack).
    marks: Vec<usize>,
    memo: HashMap<u64, usize>,
}

// Opcode bytes, named as in CPython's pickle.py.
const MARK: u8 = b'(';
const STOP: u8 = b'.';
const POP: u8 = b'0';
const POP_MARK: u8 = b'1';
const DUP: u8 = b'2';
const FLOAT: u8 = b'F';
const INT: u8 = b'I';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const LONG: u8 = b'L';
const BININT2: u8 = b'M';
const NONE: u8 = b'N';
const PERSID: u8 = b'P';
const BINPERSID: u8 = b'Q';
const REDUCE: u8 = b'R';
const STRING: u8 = b'S';
const BINSTRING: u8 = b'T';
const SHORT_BINSTRING: u8 = b'U';
const UNICODE: u8 = b'V';
const BINUNICODE: u8 = b'X';
const APPEND: u8 = b'a';
const BUILD: u8 = b'b';
const GLOBAL: u8 = b'c';
const DICT: u8 = b'd';
const EMPTY_DICT: u8 = b'}';
const APPENDS: u8 = b'e';
const GET: u8 = b'g';
const BINGET: u8 = b'h';
const INST: u8 = b'i';
const LONG_BINGET: u8 = b'j';
const LIST: u8 = b'l';
const EMPTY_LIST: u8 = b']';
const OBJ: u8 = b'o';
const PUT: u8 = b'p';
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const SETITEM: u8 = b's';
const TUPLE: u8 = b't';
const EMPTY_TUPLE: u8 = b')';
const SETITEMS: u8 = b'u';
const BINFLOAT: u8 = b'G';
const PROTO: u8 = 0x80;
const NEWOBJ: u8 = 0x81;
const EXT1: u8 = 0x82;
const EXT2: u8 = 0x83;
const EXT4: u8 = 0x84;
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const LONG1: u8 = 0x8a;
const LONG4: u8 = 0x8b;
const BINBYTES: u8 = b'B';
const SHORT_BINBYTES: u8 = b'C';
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE8: u8 = 0x8d;
const BINBYTES8: u8 = 0x8e;
const EMPTY_SET: u8 = 0x8f;
const ADDITEMS: u8 = 0x90;
const FROZENSET: u8 = 0x91;
const NEWOBJ_EX: u8 = 0x92;
const STACK_GLOBAL: u8 = 0x93;
const MEMOIZE: u8 = 0x94;
const FRAME: u8 = 0x95;
const BYTEARRAY8: u8 = 0x96;
const NEXT_BUFFER: u8 = 0x97;
const READONLY_BUFFER: u8 = 0x98;

impl<'a> Machine<'a> {
    // ---- input -------------------------------------------------------

    fn truncated(&self) -> PickleError {
        PickleError::Truncated { at: self.op_at }
    }

    fn malformed(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            at: self.op_at,
            reason: reason.into(),
        }
    }

    /// Takes `n` bytes, checking `n` against what is actually left first,
    /// so a hostile length never drives an allocation.
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let data: &'a [u8] = self.data;
        let end = self.pos.checked_add(n).ok_or_else(|| self.truncated())?;
        let s = data.get(self.pos..end).ok_or_else(|| self.truncated())?;
        self.pos = end;
        Ok(s)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take_array::<1>()?[0])
    }

    fn u32_len(&mut self) -> Result<usize, PickleError> {
        let n = u32::from_le_bytes(self.take_array()?);
        usize::try_from(n).map_err(|_| self.truncated())
    }

    fn i32_len(&mut self, op: &'static str) -> Result<usize, PickleError> {
        let n = i32::from_le_bytes(self.take_array()?);
        usize::try_from(n).map_err(|_| self.malformed(format!("{op} with negative byte count {n}")))
    }

    fn u64_len(&mut self) -> Result<usize, PickleError> {
        let n = u64::from_le_bytes(self.take_array()?);
        // A length beyond usize cannot be present in memory: truncated.
        usize::try_from(n).map_err(|_| self.truncated())
    }

    /// A text-protocol line without its `\n`.
    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let data: &'a [u8] = self.data;
        let rest = data.get(self.pos..).unwrap_or_default();
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.truncated())?;
        let line = rest.get(..nl).unwrap_or_default();
        self.pos += nl + 1;
        Ok(line)
    }

    fn utf8_line(&mut self) -> Result<&'a str, PickleError> {
        let l = self.line()?;
        std::str::from_utf8(l).map_err(|_| PickleError::BadString {
            at: self.op_at,
            reason: "not UTF-8",
        })
    }

    // ---- stack and arena ---------------------------------------------

    fn alloc(&mut self, node: Node) -> Result<usize, PickleError> {
        if self.arena.len() >= self.limits.max_elements {
            return Err(PickleError::Limit("too many objects"));
        }
        self.arena.push(node);
        Ok(self.arena.len() - 1)
    }

    fn push_id(&mut self, id: usize) -> Result<(), PickleError> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(PickleError::Limit("unpickling stack too deep"));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push(&mut self, node: Node) -> Result<(), PickleError> {
        let id = self.alloc(node)?;
        self.push_id(id)
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self, op: &'static str) -> Result<usize, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(PickleError::StackUnderflow {
                opcode: op,
                at: self.op_at,
            });
        }
        self.stack.pop().ok_or(PickleError::StackUnderflow {
            opcode: op,
            at: self.op_at,
        })
    }

    fn top(&self, op: &'static str) -> Result<usize, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(PickleError::StackUnderflow {
                opcode: op,
                at: self.op_at,
            });
        }
        self.stack
            .last()
            .copied()
            .ok_or(PickleError::StackUnderflow {
                opcode: op,
                at: self.op_at,
            })
    }

    /// Everything pushed since the last MARK, removing the mark.
    fn pop_mark(&mut self, op: &'static str) -> Result<Vec<usize>, PickleError> {
        let m = self.marks.pop().ok_or(PickleError::NoMark {
            opcode: op,
            at: self.op_at,
        })?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }

    fn node(&self, id: usize) -> Result<&Node, PickleError> {
        self.arena
            .get(id)
            .ok_or_else(|| self.malformed("internal: dangling object reference"))
    }

    fn node_mut(&mut self, id: usize) -> Result<&mut Node, PickleError> {
        let at = self.op_at;
        self.arena.get_mut(id).ok_or(PickleError::Malformed {
            at,
            reason: "internal: dangling object reference".into(),
        })
    }

    fn memo_put(&mut self, key: u64, id: usize) -> Result<(), PickleError> {
        if !self.memo.contains_key(&key) && self.memo.len() >= self.limits.max_memo {
            return Err(PickleError::Limit("too many memo entries"));
        }
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let id = *self.memo.get(&key).ok_or(PickleError::MemoMissing {
            key,
            at: self.op_at,
        })?;
        self.push_id(id)
    }

    /// Dict keys and set items must be hashable in Python; refuse the
    /// obviously unhashable ones rather than build something Python could not.
    fn check_hashable(&self, id: usize) -> Result<(), PickleError> {
        match self.node(id)? {
            Node::List(_)
            | Node::Dict(_)
            | Node::Set(_)
            | Node::PendingUuid
            // A Signature is a dict subclass; arrays are unhashable too.
            | Node::Object {
                class: DataClass::CelerySignature | DataClass::NdArray,
                ..
            } => {
                Err(self.malformed(format!("unhashable type: '{}'", self.node(id)?.kind())))
            }
            _ => Ok(()),
        }
    }

    // ---- the loop ----------------------------------------------------

    fn run(&mut self) -> Result<usize, PickleError> {
        loop {
            self.op_at = self.pos;
            let op = match self.data.get(self.pos) {
                Some(&b) => b,
                None => return Err(self.truncated()),
            };
            self.pos += 1;
            match op {
                PROTO => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(PickleError::UnsupportedProtocol(v));
                    }
                }
                FRAME => {
                    let n = self.u64_len()?;
                    if n > self.data.len().saturating_sub(self.pos) {
                        return Err(self.truncated());
                    }
                }
                STOP => return self.pop("STOP"),
                MARK => {
                    if self.marks.len() >= self.limits.max_marks {
                        return Err(PickleError::Limit("too many nested MARKs"));
                    }
                    self.marks.push(self.stack.len());
                }
                POP => {
                    if self.stack.len() > self.floor() {
                        self.pop("POP")?;
                    } else {
                        self.pop_mark("POP")?;
                    }
                }
                POP_MARK => {
                    self.pop_mark("POP_MARK")?;
                }
                DUP => {
                    let t = self.top("DUP")?;
                    self.push_id(t)?;
                }
                NONE => self.push(Node::Leaf(Value::None))?,
                NEWTRUE => self.push(Node::Leaf(Value::Bool(true)))?,
                NEWFALSE => self.push(Node::Leaf(Value::Bool(false)))?,
                INT => {
                    let l = self.line()?;
                    let v = match l {
                        b"00" => Value::Bool(false),
                        b"01" => Value::Bool(true),
                        _ => self.int_text(l)?,
                    };
                    self.push(Node::Leaf(v))?;
                }
                LONG => {
                    let l = self.line()?;
                    let l = l.strip_suffix(b"L").unwrap_or(l);
                    let v = self.int_text(l)?;
                    self.push(Node::Leaf(v))?;
                }
                BININT => {
                    let v = i32::from_le_bytes(self.take_array()?);
                    self.push(Node::Leaf(Value::Int(v.into())))?;
                }
                BININT1 => {
                    let v = self.u8()?;
                    self.push(Node::Leaf(Value::Int(v.into())))?;
                }
                BININT2 => {
                    let v = u16::from_le_bytes(self.take_array()?);
                    self.push(Node::Leaf(Value::Int(v.into())))?;
                }
                LONG1 => {
                    let n = usize::from(self.u8()?);
                    let b = self.take(n)?;
                    let v = self.int_le(b)?;
                    self.push(Node::Leaf(v))?;
                }
                LONG4 => {
                    let n = self.i32_len("LONG4")?;
                    let b = self.take(n)?;
                    let v = self.int_le(b)?;
                    self.push(Node::Leaf(v))?;
                }
                FLOAT => {
                    let l = self.line()?;
                    let f = std::str::from_utf8(l)
                        .ok()
                        .and_then(|s| s.trim().parse::<f64>().ok())
                        .ok_or_else(|| self.malformed("FLOAT argument is not a number"))?;
                    self.push(Node::Leaf(Value::Float(f)))?;
                }
                BINFLOAT => {
                    let f = f64::from_be_bytes(self.take_array()?);
                    self.push(Node::Leaf(Value::Float(f)))?;
                }
                STRING => {
                    let l = self.line()?;
                    let s = self.py2_string_text(l)?;
                    self.push(Node::Leaf(Value::Str(s)))?;
                }
                BINSTRING => {
                    let n = self.i32_len("BINSTRING")?;
                    let b = self.take(n)?;
                    let s = self.ascii(b)?;
                    self.push(Node::Leaf(Value::Str(s)))?;
                }
                SHORT_BINSTRING => {
                    let n = usize::from(self.u8()?);
                    let b = self.take(n)?;
                    let s = self.ascii(b)?;
                    self.push(Node::Leaf(Value::Str(s)))?;
                }
                UNICODE => {
                    let l = self.line()?;
                    let s = raw_unicode_escape(l).ok_or(PickleError::BadString {
                        at: self.op_at,
                        reason: "bad raw-unicode-escape data",
                    })?;
                    self.push(Node::Leaf(Value::Str(s)))?;
                }
                BINUNICODE => {
                    let n = self.u32_len()?;
                    self.unicode(n)?;
                }
                SHORT_BINUNICODE => {
                    let n = usize::from(self.u8()?);
                    self.unicode(n)?;
                }
                BINUNICODE8 => {
                    let n = self.u64_len()?;
                    self.unicode(n)?;
                }
                BINBYTES => {
                    let n = self.u32_len()?;
                    self.bytes(n)?;
                }
                SHORT_BINBYTES => {
                    let n = usize::from(self.u8()?);
                    self.bytes(n)?;
                }
                BINBYTES8 | BYTEARRAY8 => {
                    let n = self.u64_len()?;
                    self.bytes(n)?;
                }
                EMPTY_LIST => self.push(Node::List(Vec::new()))?,
                EMPTY_DICT => self.push(Node::Dict(Vec::new()))?,
                EMPTY_TUPLE => self.push(Node::Tuple(Vec::new()))?,
                EMPTY_SET => self.push(Node::Set(Vec::new()))?,
                LIST => {
                    let items = self.pop_mark("LIST")?;
                    self.push(Node::List(items))?;
                }
                TUPLE => {
                    let items = self.pop_mark("TUPLE")?;
                    self.push(Node::Tuple(items))?;
                }
                TUPLE1 | TUPLE2 | TUPLE3 => {
                    let n = usize::from(op - TUPLE1) + 1;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop("TUPLEn")?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items))?;
                }
                DICT => {
                    let items = self.pop_mark("DICT")?;
                    let pairs = self.pairs(&items, "DICT")?;
                    self.push(Node::Dict(pairs))?;
                }
                FROZENSET => {
                    let items = self.pop_mark("FROZENSET")?;
                    for &i in &items {
                        self.check_hashable(i)?;
                    }
                    self.push(Node::Set(items))?;
                }
                APPEND => {
                    let v = self.pop("APPEND")?;
                    let target = self.top("APPEND")?;
                    self.extend_list(target, vec![v], "APPEND")?;
                }
                APPENDS => {
                    let items = self.pop_mark("APPENDS")?;
                    let target = self.top("APPENDS")?;
                    self.extend_list(target, items, "APPENDS")?;
                }
                SETITEM => {
                    let v = self.pop("SETITEM")?;
                    let k = self.pop("SETITEM")?;
                    let target = self.top("SETITEM")?;
                    self.check_hashable(k)?;
                    self.set_items(target, vec![(k, v)], "SETITEM")?;
                }
                SETITEMS => {
                    let items = self.pop_mark("SETITEMS")?;
                    let target = self.top("SETITEMS")?;
                    let pairs = self.pairs(&items, "SETITEMS")?;
                    self.set_items(target, pairs, "SETITEMS")?;
                }
                ADDITEMS => {
                    let items = self.pop_mark("ADDITEMS")?;
                    let target = self.top("ADDITEMS")?;
                    for &i in &items {
                        self.check_hashable(i)?;
                    }
                    match self.node_mut(target)? {
                        Node::Set(v) => v.extend(items),
                        other => {
                            let kind = other.kind();
                            return Err(self.malformed(format!("ADDITEMS on a {kind}")));
                        }
                    }
                }
                PUT => {
                    let key = self.index_line("PUT")?;
                    let t = self.top("PUT")?;
                    self.memo_put(key, t)?;
                }
                BINPUT => {
                    let key = u64::from(self.u8()?);
                    let t = self.top("BINPUT")?;
                    self.memo_put(key, t)?;
                }
                LONG_BINPUT => {
                    let key = u64::from(u32::from_le_bytes(self.take_array()?));
                    let t = self.top("LONG_BINPUT")?;
                    self.memo_put(key, t)?;
                }
                MEMOIZE => {
                    let t = self.top("MEMOIZE")?;
                    let key = self.memo.len() as u64;
                    self.memo_put(key, t)?;
                }
                GET => {
                    let key = self.index_line("GET")?;
                    self.memo_get(key)?;
                }
                BINGET => {
                    let key = u64::from(self.u8()?);
                    self.memo_get(key)?;
                }
                LONG_BINGET => {
                    let key = u64::from(u32::from_le_bytes(self.take_array()?));
                    self.memo_get(key)?;
                }
                GLOBAL => {
                    let module = self.utf8_line()?;
                    let name = self.utf8_line()?;
                    let node = resolve_global(module, name)?;
                    self.push(node)?;
                }
                STACK_GLOBAL => {
                    let name = self.pop("STACK_GLOBAL")?;
                    let module = self.pop("STACK_GLOBAL")?;
                    let (Node::Leaf(Value::Str(m)), Node::Leaf(Value::Str(n))) =
                        (self.node(module)?, self.node(name)?)
                    else {
                        return Err(self.malformed("STACK_GLOBAL requires str"));
                    };
                    let node = resolve_global(m, n)?;
                    self.push(node)?;
                }
                REDUCE => {
                    let args = self.pop("REDUCE")?;
                    let callable = self.pop("REDUCE")?;
                    let args = match self.node(args)? {
                        Node::Tuple(a) => a.clone(),
                        other => {
                            let kind = other.kind();
                            return Err(self.malformed(format!(
                                "REDUCE arguments must be a tuple, not {kind}"
                            )));
                        }
                    };
                    let g = self.callable(callable, "REDUCE")?;
                    let node = match g {
                        Global::Data(DataClass::CelerySignature) => self.signature(&args)?,
                        Global::Data(DataClass::Range) => self.range(&args)?,
                        Global::Data(DataClass::NdArray) => self.ndarray(&args)?,
                        Global::Data(DataClass::NumpyDtype) => self.dtype(&args)?,
                        Global::Data(DataClass::NumpyScalar) => self.numpy_scalar(&args)?,
                        _ => self.call(g, &args)?,
                    };
                    self.push(node)?;
                }
                INST => {
                    let module = self.utf8_line()?;
                    let name = self.utf8_line()?;
                    let g = match resolve_global(module, name)? {
                        Node::Global(g) => g,
                        _ => {
                            return Err(
                                self.malformed(format!("INST of non-callable {module}.{name}"))
                            )
                        }
                    };
                    let args = self.pop_mark("INST")?;
                    let node = self.call(g, &args)?;
                    self.push(node)?;
                }
                OBJ => {
                    let mut items = self.pop_mark("OBJ")?;
                    if items.is_empty() {
                        return Err(PickleError::StackUnderflow {
                            opcode: "OBJ",
                            at: self.op_at,
                        });
                    }
                    let callable = items.remove(0);
                    let g = self.callable(callable, "OBJ")?;
                    let node = self.call(g, &items)?;
                    self.push(node)?;
                }
                NEWOBJ => {
                    let args = self.pop("NEWOBJ")?;
                    let cls = self.pop("NEWOBJ")?;
                    self.newobj(cls, args, None)?;
                }
                NEWOBJ_EX => {
                    let kwargs = self.pop("NEWOBJ_EX")?;
                    let args = self.pop("NEWOBJ_EX")?;
                    let cls = self.pop("NEWOBJ_EX")?;
                    self.newobj(cls, args, Some(kwargs))?;
                }
                BUILD => {
                    let state = self.pop("BUILD")?;
                    let target = self.top("BUILD")?;
                    self.build(target, state)?;
                }
                PERSID | BINPERSID => {
                    return Err(PickleError::Unsupported {
                        opcode: if op == PERSID { "PERSID" } else { "BINPERSID" },
                        at: self.op_at,
                        reason: "persistent ids need an application-defined loader",
                    })
                }
                EXT1 | EXT2 | EXT4 => {
                    return Err(PickleError::Unsupported {
                        opcode: match op {
                            EXT1 => "EXT1",
                            EXT2 => "EXT2",
                            _ => "EXT4",
                        },
                        at: self.op_at,
                        reason: "the copyreg extension registry names arbitrary globals",
                    })
                }
                NEXT_BUFFER | READONLY_BUFFER => {
                    return Err(PickleError::Unsupported {
                        opcode: if op == NEXT_BUFFER {
                            "NEXT_BUFFER"
                        } else {
                            "READONLY_BUFFER"
                        },
                        at: self.op_at,
                        reason: "out-of-band buffers are never sent over a broker",
                    })
                }
                other => {
                    return Err(PickleError::BadOpcode {
                        opcode: other,
                        at: self.op_at,
                    })
                }
            }
        }
    }

    // ---- opcode helpers ----------------------------------------------

    fn unicode(&mut self, n: usize) -> Result<(), PickleError> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| PickleError::BadString {
            at: self.op_at,
            reason: "not UTF-8 (lone surrogates are not supported either)",
        })?;
        self.push(Node::Leaf(Value::Str(s.to_owned())))
    }

    fn bytes(&mut self, n: usize) -> Result<(), PickleError> {
        let b = self.take(n)?;
        self.push(Node::Leaf(Value::Bytes(b.to_vec())))
    }

    /// Python 2 `str` read with `encoding='ASCII'` (what `pickle.loads` and
    /// kombu use by default).
    fn ascii(&self, b: &[u8]) -> Result<String, PickleError> {
        if b.is_ascii() {
            Ok(b.iter().map(|&c| char::from(c)).collect())
        } else {
            Err(PickleError::BadString {
                at: self.op_at,
                reason: "Python 2 str is not ASCII",
            })
        }
    }

    /// The `STRING` argument: a quoted `repr` with backslash escapes.
    fn py2_string_text(&self, l: &[u8]) -> Result<String, PickleError> {
        let inner = match l {
            [q, inner @ .., q2] if (*q == b'\'' || *q == b'"') && q == q2 => inner,
            _ => return Err(self.malformed("the STRING opcode argument must be quoted")),
        };
        let bytes = escape_decode(inner).ok_or(PickleError::BadString {
            at: self.op_at,
            reason: "bad escape in STRING",
        })?;
        self.ascii(&bytes)
    }

    fn index_line(&mut self, op: &'static str) -> Result<u64, PickleError> {
        let l = self.line()?;
        std::str::from_utf8(l)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| self.malformed(format!("{op} index is not a non-negative integer")))
    }

    /// A decimal integer from the text protocol (`INT`, `LONG`).
    fn int_text(&self, l: &[u8]) -> Result<Value, PickleError> {
        if l.len() > self.limits.max_int_bytes * 3 {
            return Err(PickleError::Limit("integer too large"));
        }
        let s = std::str::from_utf8(l).unwrap_or("").trim();
        int_from_decimal(s).ok_or_else(|| self.malformed(format!("invalid integer literal {s:?}")))
    }

    /// A two's-complement little-endian integer (`LONG1`/`LONG4`).
    fn int_le(&self, b: &[u8]) -> Result<Value, PickleError> {
        if b.len() > self.limits.max_int_bytes {
            return Err(PickleError::Limit("integer too large"));
        }
        Ok(int_from_le_twos(b))
    }

    fn pairs(&self, items: &[usize], op: &'static str) -> Result<Vec<(usize, usize)>, PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed(format!("{op} with an odd number of items")));
        }
        let mut out = Vec::with_capacity(items.len() / 2);
        for kv in items.chunks_exact(2) {
            if let [k, v] = kv {
                self.check_hashable(*k)?;
                out.push((*k, *v));
            }
        }
        Ok(out)
    }

    fn extend_list(
        &mut self,
        target: usize,
        items: Vec<usize>,
        op: &'static str,
    ) -> Result<(), PickleError> {
        match self.node_mut(target)? {
            Node::List(v) => {
                v.extend(items);
                Ok(())
            }
            other => {
                let kind = other.kind();
                Err(self.malformed(format!("{op} on a {kind}")))
            }
        }
    }

    fn set_items(
        &mut self,
        target: usize,
        pairs: Vec<(usize, usize)>,
        op: &'static str,
    ) -> Result<(), PickleError> {
        match self.node_mut(target)? {
            Node::Dict(d) => {
                d.extend(pairs);
                Ok(())
            }
            other => {
                let kind = other.kind();
                Err(self.malformed(format!("{op} on a {kind}")))
            }
        }
    }

    fn callable(&self, id: usize, op: &'static str) -> Result<Global, PickleError> {
        match self.node(id)? {
            Node::Global(g) => Ok(*g),
            other => Err(self.malformed(format!("{op} of a {} (not callable)", other.kind()))),
        }
    }

    fn bad_call(&self, g: Global, reason: impl Into<String>) -> PickleError {
        PickleError::BadCall {
            callable: g.name().to_owned(),
            at: self.op_at,
            reason: reason.into(),
        }
    }

    fn leaf(&self, id: usize) -> Option<&Value> {
        match self.arena.get(id) {
            Some(Node::Leaf(v)) => Some(v),
            _ => None,
        }
    }

    fn leaves(&self, ids: &[usize]) -> Option<Vec<&Value>> {
        ids.iter().map(|&i| self.leaf(i)).collect()
    }

    fn ints(&self, ids: &[usize]) -> Option<Vec<i64>> {
        ids.iter()
            .map(|&i| self.leaf(i).and_then(Value::as_i64))
            .collect()
    }

    /// Applies an allow-listed callable to the argument shapes CPython 3's
    /// `__reduce__` implementations produce. Nothing else is accepted.
    fn call(&self, g: Global, args: &[usize]) -> Result<Node, PickleError> {
        let unexpected =
            || self.bad_call(g, format!("unexpected arguments ({})", self.shape(args)));
        match g {
            Global::DateTime => {
                let (state, tz) = match args {
                    [s] => (*s, None),
                    [s, tz] => (*s, Some(*tz)),
                    _ => (usize::MAX, None),
                };
                let offset = match tz {
                    Some(t) => self.tz_offset(g, t)?,
                    None => None,
                };
                let naive = match self.leaf(state) {
                    Some(Value::Bytes(b)) => datetime_from_state(b),
                    _ => match self.ints(args) {
                        // datetime(year, month, day[, hour, minute, second, microsecond])
                        Some(v) if (3..=7).contains(&v.len()) => datetime_from_ints(&v),
                        _ => return Err(unexpected()),
                    },
                }
                .ok_or_else(|| self.bad_call(g, "invalid datetime state"))?;
                Ok(Node::Leaf(Value::DateTime {
                    naive,
                    offset_seconds: offset,
                }))
            }
            Global::Date => {
                let d = match (args, self.ints(args)) {
                    ([s], _) if matches!(self.leaf(*s), Some(Value::Bytes(_))) => {
                        match self.leaf(*s) {
                            Some(Value::Bytes(b)) => date_from_state(b),
                            _ => None,
                        }
                    }
                    (_, Some(v)) => match v.as_slice() {
                        [y, m, d] => date_from_ymd(*y, *m, *d),
                        _ => return Err(unexpected()),
                    },
                    _ => return Err(unexpected()),
                };
                Ok(Node::Leaf(Value::Date(
                    d.ok_or_else(|| self.bad_call(g, "invalid date state"))?,
                )))
            }
            Global::Time => {
                let (state, tz) = match args {
                    [s] => (*s, None),
                    [s, tz] => (*s, Some(*tz)),
                    _ => return Err(unexpected()),
                };
                if let Some(tz) = tz {
                    if self.tz_offset(g, tz)?.is_some() {
                        return Err(
                            self.bad_call(g, "timezone-aware datetime.time is not supported")
                        );
                    }
                }
                let t = match self.leaf(state) {
                    Some(Value::Bytes(b)) => time_from_state(b),
                    _ => return Err(unexpected()),
                };
                Ok(Node::Leaf(Value::Time(
                    t.ok_or_else(|| self.bad_call(g, "invalid time state"))?,
                )))
            }
            Global::TimeDelta => {
                let v = self
                    .ints(args)
                    .filter(|v| v.len() <= 3)
                    .ok_or_else(unexpected)?;
                let get = |i: usize| v.get(i).copied().unwrap_or(0);
                Ok(Node::Leaf(
                    timedelta_normalized(get(0), get(1), get(2))
                        .ok_or_else(|| self.bad_call(g, "timedelta out of range"))?,
                ))
            }
            Global::TimeZone => {
                let (td, name) = match args {
                    [td] => (*td, None),
                    [td, name] => (*td, Some(*name)),
                    _ => return Err(unexpected()),
                };
                if let Some(n) = name {
                    if !matches!(self.leaf(n), Some(Value::Str(_))) {
                        return Err(unexpected());
                    }
                }
                match self.leaf(td) {
                    Some(Value::TimeDelta {
                        days,
                        seconds,
                        microseconds,
                    }) => {
                        let total = days * 86_400 + seconds;
                        if *microseconds != 0 || total.abs() >= 86_400 {
                            return Err(self
                                .bad_call(g, "offset must be whole seconds strictly within ±24h"));
                        }
                        let off = i32::try_from(total).map_err(|_| unexpected())?;
                        Ok(Node::TzInfo(off))
                    }
                    _ => Err(unexpected()),
                }
            }
            Global::PytzUtc => {
                if args.is_empty() {
                    Ok(Node::TzInfo(0))
                } else {
                    Err(unexpected())
                }
            }
            Global::Decimal => match self.leaves(args).as_deref() {
                Some([Value::Str(s)]) if is_decimal_text(s) => {
                    Ok(Node::Leaf(Value::Decimal(s.clone())))
                }
                Some([Value::Str(_)]) => Err(self.bad_call(g, "not a decimal literal")),
                _ => Err(unexpected()),
            },
            Global::Uuid => match self.leaves(args).as_deref() {
                Some([Value::Str(s)]) => uuid::Uuid::parse_str(s)
                    .map(|u| Node::Leaf(Value::Uuid(u)))
                    .map_err(|e| self.bad_call(g, e.to_string())),
                _ => Err(unexpected()),
            },
            Global::Set | Global::FrozenSet => match args {
                [] => Ok(Node::Set(Vec::new())),
                [items] => match self.node(*items)? {
                    Node::List(v) | Node::Tuple(v) | Node::Set(v) => {
                        for &i in v {
                            self.check_hashable(i)?;
                        }
                        Ok(Node::Set(v.clone()))
                    }
                    _ => Err(unexpected()),
                },
                _ => Err(unexpected()),
            },
            Global::ByteArray | Global::Bytes => match self.leaves(args).as_deref() {
                Some([]) => Ok(Node::Leaf(Value::Bytes(Vec::new()))),
                Some([Value::Bytes(b)]) => Ok(Node::Leaf(Value::Bytes(b.clone()))),
                Some([Value::Str(s), Value::Str(enc)]) => {
                    Ok(Node::Leaf(Value::Bytes(self.latin1(g, s, enc)?)))
                }
                _ => Err(unexpected()),
            },
            Global::CodecsEncode => match self.leaves(args).as_deref() {
                Some([Value::Str(s), Value::Str(enc)]) => {
                    Ok(Node::Leaf(Value::Bytes(self.latin1(g, s, enc)?)))
                }
                _ => Err(unexpected()),
            },
            Global::OrderedDict => match args {
                [] => Ok(Node::Dict(Vec::new())),
                [items] => {
                    let (Node::List(v) | Node::Tuple(v)) = self.node(*items)? else {
                        return Err(unexpected());
                    };
                    let mut pairs = Vec::with_capacity(v.len());
                    for &p in v {
                        match self.node(p)? {
                            Node::List(kv) | Node::Tuple(kv) if kv.len() == 2 => {
                                let (Some(&k), Some(&val)) = (kv.first(), kv.get(1)) else {
                                    return Err(unexpected());
                                };
                                self.check_hashable(k)?;
                                pairs.push((k, val));
                            }
                            _ => return Err(unexpected()),
                        }
                    }
                    Ok(Node::Dict(pairs))
                }
                _ => Err(unexpected()),
            },
            Global::Reconstructor => {
                // copyreg._reconstructor(cls, base, state): protocols 0/1 for UUID.
                match args {
                    [cls, base, state]
                        if matches!(self.node(*cls)?, Node::Global(Global::Uuid))
                            && matches!(self.node(*base)?, Node::Global(Global::Object))
                            && matches!(self.leaf(*state), Some(Value::None)) =>
                    {
                        Ok(Node::PendingUuid)
                    }
                    // Protocols 0-1 for a str subclass: str.__new__(cls, text).
                    [cls, base, text]
                        if matches!(
                            self.node(*cls)?,
                            Node::Global(Global::Data(DataClass::PassthroughDataset))
                        ) =>
                    {
                        if !matches!(self.node(*base)?, Node::Global(Global::Str)) {
                            return Err(self.bad_call(
                                g,
                                "PassthroughDataset must be reconstructed from builtins.str",
                            ));
                        }
                        self.passthrough(&[*text], "copyreg._reconstructor")
                    }
                    [cls, ..] => match self.node(*cls)? {
                        Node::Global(other) if *other != Global::Uuid => Err(self.bad_call(
                            g,
                            format!(
                                "only uuid.UUID and PassthroughDataset may be reconstructed, not {}",
                                other.name()
                            ),
                        )),
                        _ => Err(unexpected()),
                    },
                    _ => Err(unexpected()),
                }
            }
            Global::Object => Err(self.bad_call(
                g,
                "builtins.object is only accepted as copyreg._reconstructor's base",
            )),
            Global::Str => Err(self.bad_call(
                g,
                "builtins.str is only accepted as copyreg._reconstructor's base",
            )),
            Global::Data(DataClass::PassthroughDataset) => Err(self.bad_call(
                g,
                "only accepted via NEWOBJ/NEWOBJ_EX or copyreg._reconstructor",
            )),
            Global::Data(
                DataClass::CelerySignature
                | DataClass::Range
                | DataClass::NdArray
                | DataClass::NumpyDtype
                | DataClass::NumpyScalar,
            ) => Err(self.bad_call(g, "only accepted via REDUCE")),
            Global::NdArrayType => Err(self.bad_call(
                g,
                "only accepted as numpy.core.multiarray._reconstruct's first argument",
            )),
        }
    }

    /// `celery.canvas.signature(d)` via `REDUCE`: exactly one `dict`.
    fn signature(&self, args: &[usize]) -> Result<Node, PickleError> {
        let g = Global::Data(DataClass::CelerySignature);
        match args {
            [d] if matches!(self.node(*d)?, Node::Dict(_)) => Ok(Node::Object {
                class: DataClass::CelerySignature,
                args: vec![*d],
                state: None,
            }),
            _ => Err(self.bad_call(
                g,
                format!(
                    "expects exactly one dict argument, got ({})",
                    self.shape(args)
                ),
            )),
        }
    }

    /// `range(start, stop, step)` via `REDUCE`: exactly three ints, step not 0
    /// (what `range.__reduce__` writes; Python refuses a zero step).
    fn range(&self, args: &[usize]) -> Result<Node, PickleError> {
        let g = Global::Data(DataClass::Range);
        let ints = args
            .iter()
            .map(|a| Ok(matches!(self.node(*a)?, Node::Leaf(Value::Int(_)))))
            .collect::<Result<Vec<bool>, PickleError>>()?;
        let step_is_zero = matches!(
            args.get(2).map(|a| self.node(*a)).transpose()?,
            Some(Node::Leaf(Value::Int(0)))
        );
        if args.len() != 3 || ints.contains(&false) || step_is_zero {
            return Err(self.bad_call(
                g,
                format!(
                    "expects three int arguments (start, stop, step != 0), got ({})",
                    self.shape(args)
                ),
            ));
        }
        Ok(Node::Object {
            class: DataClass::Range,
            args: args.to_vec(),
            state: None,
        })
    }

    /// `numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`, as
    /// `ndarray.__reduce__` writes it: an empty array awaiting its `BUILD`.
    fn ndarray(&self, args: &[usize]) -> Result<Node, PickleError> {
        let g = Global::Data(DataClass::NdArray);
        let ok = match args {
            [cls, shape, _tag] => {
                matches!(self.node(*cls)?, Node::Global(Global::NdArrayType))
                    && matches!(self.node(*shape)?, Node::Tuple(t) if t.len() == 1)
            }
            _ => false,
        };
        if !ok {
            return Err(self.bad_call(
                g,
                format!(
                    "expects (numpy.ndarray, (0,), b'b'), got ({})",
                    self.shape(args)
                ),
            ));
        }
        Ok(Node::Object {
            class: DataClass::NdArray,
            args: Vec::new(),
            state: None,
        })
    }

    /// `numpy.dtype(name, align, copy)`; its state comes with `BUILD`.
    fn dtype(&self, args: &[usize]) -> Result<Node, PickleError> {
        let ok = matches!(args, [n, a, c]
            if matches!(self.leaf(*n), Some(Value::Str(_)))
                && matches!(self.leaf(*a), Some(Value::Bool(_)))
                && matches!(self.leaf(*c), Some(Value::Bool(_))));
        if !ok {
            return Err(self.bad_call(
                Global::Data(DataClass::NumpyDtype),
                format!("expects (name, align, copy), got ({})", self.shape(args)),
            ));
        }
        Ok(Node::Object {
            class: DataClass::NumpyDtype,
            args: args.to_vec(),
            state: None,
        })
    }

    /// `numpy.core.multiarray.scalar(dtype, raw)`: a numpy scalar.
    fn numpy_scalar(&self, args: &[usize]) -> Result<Node, PickleError> {
        let ok = match args {
            [d, raw] => {
                matches!(
                    self.node(*d)?,
                    Node::Object {
                        class: DataClass::NumpyDtype,
                        ..
                    }
                ) && matches!(self.leaf(*raw), Some(Value::Bytes(_)))
            }
            _ => false,
        };
        if !ok {
            return Err(self.bad_call(
                Global::Data(DataClass::NumpyScalar),
                format!("expects (dtype, bytes), got ({})", self.shape(args)),
            ));
        }
        Ok(Node::Object {
            class: DataClass::NumpyScalar,
            args: args.to_vec(),
            state: None,
        })
    }

    /// `PassthroughDataset` from its constructor arguments: exactly one `str`.
    fn passthrough(&self, args: &[usize], via: &str) -> Result<Node, PickleError> {
        match args {
            [s] if matches!(self.leaf(*s), Some(Value::Str(_))) => Ok(Node::Object {
                class: DataClass::PassthroughDataset,
                args: vec![*s],
                state: None,
            }),
            _ => Err(self.bad_call(
                Global::Data(DataClass::PassthroughDataset),
                format!(
                    "{via} expects exactly one str argument, got ({})",
                    self.shape(args)
                ),
            )),
        }
    }

    /// The argument kinds, for error messages: `str, dict`.
    fn shape(&self, args: &[usize]) -> String {
        args.iter()
            .map(|&a| self.node(a).map(Node::kind).unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn latin1(&self, g: Global, s: &str, enc: &str) -> Result<Vec<u8>, PickleError> {
        if !matches!(enc, "latin1" | "latin-1" | "iso-8859-1") {
            return Err(self.bad_call(g, format!("unexpected encoding {enc:?}")));
        }
        s.chars()
            .map(|c| u8::try_from(u32::from(c)).ok())
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| self.bad_call(g, "latin-1 text contains a character above U+00FF"))
    }

    /// A tzinfo argument: `None` (naive) or a timezone object.
    fn tz_offset(&self, g: Global, id: usize) -> Result<Option<i32>, PickleError> {
        match self.node(id)? {
            Node::Leaf(Value::None) => Ok(None),
            Node::TzInfo(o) => Ok(Some(*o)),
            other => Err(self.bad_call(
                g,
                format!("tzinfo must be a datetime.timezone, not {}", other.kind()),
            )),
        }
    }

    fn newobj(
        &mut self,
        cls: usize,
        args: usize,
        kwargs: Option<usize>,
    ) -> Result<(), PickleError> {
        let op = if kwargs.is_some() {
            "NEWOBJ_EX"
        } else {
            "NEWOBJ"
        };
        let g = self.callable(cls, op)?;
        let empty_args = matches!(self.node(args)?, Node::Tuple(a) if a.is_empty());
        let empty_kwargs = match kwargs {
            None => true,
            Some(k) => matches!(self.node(k)?, Node::Dict(d) if d.is_empty()),
        };
        match g {
            Global::Uuid if empty_args && empty_kwargs => self.push(Node::PendingUuid),
            Global::Uuid => Err(self.bad_call(g, format!("{op} expects no arguments"))),
            Global::Data(DataClass::PassthroughDataset) => {
                if !empty_kwargs {
                    return Err(self.bad_call(g, format!("{op} expects no keyword arguments")));
                }
                let args = match self.node(args)? {
                    Node::Tuple(a) => a.clone(),
                    other => {
                        let kind = other.kind();
                        return Err(
                            self.bad_call(g, format!("{op} arguments must be a tuple, not {kind}"))
                        );
                    }
                };
                let node = self.passthrough(&args, op)?;
                self.push(node)
            }
            other => Err(self.bad_call(other, format!("{op} is not accepted for this class"))),
        }
    }

    /// `BUILD`: a UUID awaiting its `{'int': n}` state, a
    /// `PassthroughDataset` taking its (one) `dict` state, or a numpy array or
    /// dtype taking its (one) `tuple` state (checked whole once decoded, see
    /// [`DataClass::check`]).
    fn build(&mut self, target: usize, state: usize) -> Result<(), PickleError> {
        if let Node::Object {
            class,
            state: current,
            ..
        } = self.node(target)?
        {
            let class = *class;
            let g = Global::Data(class);
            let wanted = match class {
                DataClass::PassthroughDataset => "dict",
                DataClass::NdArray | DataClass::NumpyDtype => "tuple",
                _ => return Err(self.bad_call(g, "BUILD is not accepted for this class")),
            };
            if current.is_some() {
                return Err(self.bad_call(g, "BUILD applied twice"));
            }
            let fits = match self.node(state)? {
                Node::Dict(_) => wanted == "dict",
                Node::Tuple(_) => wanted == "tuple",
                _ => false,
            };
            if !fits {
                let kind = self.node(state)?.kind();
                return Err(self.bad_call(g, format!("BUILD state must be a {wanted}, not {kind}")));
            }
            if let Node::Object { state: slot, .. } = self.node_mut(target)? {
                *slot = Some(state);
            }
            return Ok(());
        }
        if !matches!(self.node(target)?, Node::PendingUuid) {
            let kind = self.node(target)?.kind();
            return Err(PickleError::BadCall {
                callable: format!("BUILD on {kind}"),
                at: self.op_at,
                reason: "only uuid.UUID and PassthroughDataset state is accepted".into(),
            });
        }
        let bad = |m: &Machine, r: &str| m.bad_call(Global::Uuid, r.to_owned());
        // state is a dict, or (dict|None, slots-dict) for __slots__ classes.
        let dicts: Vec<usize> = match self.node(state)? {
            Node::Dict(_) => vec![state],
            Node::Tuple(t) if t.len() == 2 => t
                .iter()
                .copied()
                .filter(|&i| !matches!(self.leaf(i), Some(Value::None)))
                .collect(),
            _ => return Err(bad(self, "state must be a dict")),
        };
        let mut int = None;
        for d in dicts {
            let Node::Dict(items) = self.node(d)? else {
                return Err(bad(self, "state must be a dict"));
            };
            for (k, v) in items {
                match (self.leaf(*k), self.leaf(*v)) {
                    (Some(Value::Str(k)), Some(v)) if k == "int" => int = Some(v.clone()),
                    (Some(Value::Str(k)), Some(Value::Int(_) | Value::None)) if k == "is_safe" => {}
                    _ => return Err(bad(self, "unexpected UUID state key")),
                }
            }
        }
        let n: u128 = match int {
            Some(Value::Int(i)) => u128::try_from(i).map_err(|_| bad(self, "negative UUID int"))?,
            Some(Value::BigInt(s)) => s.parse().map_err(|_| bad(self, "UUID int out of range"))?,
            _ => return Err(bad(self, "UUID state lacks 'int'")),
        };
        *self.node_mut(target)? = Node::Leaf(Value::Uuid(uuid::Uuid::from_u128(n)));
        Ok(())
    }

    // ---- materialization ---------------------------------------------

    fn materialize(
        &self,
        id: usize,
        depth: usize,
        budget: &mut Budget,
        visiting: &mut [bool],
    ) -> Result<Value, PickleError> {
        if depth > self.limits.max_depth {
            return Err(PickleError::Limit("nested too deeply"));
        }
        budget.values = budget
            .values
            .checked_sub(1)
            .ok_or(PickleError::Limit("too many values"))?;
        let node = self.node(id)?;
        if let Node::Leaf(v) = node {
            let n = match v {
                Value::Str(s) | Value::BigInt(s) | Value::Decimal(s) => s.len(),
                Value::Bytes(b) => b.len(),
                _ => 0,
            };
            budget.bytes = budget
                .bytes
                .checked_sub(n)
                .ok_or(PickleError::Limit("output too large"))?;
            return Ok(v.clone());
        }
        let seen = visiting.get_mut(id).ok_or(PickleError::Recursive)?;
        if *seen {
            return Err(PickleError::Recursive);
        }
        *seen = true;
        let seq = |ids: &[usize], budget: &mut Budget, visiting: &mut [bool]| {
            ids.iter()
                .map(|&i| self.materialize(i, depth + 1, budget, visiting))
                .collect::<Result<Vec<_>, _>>()
        };
        let out = match node {
            Node::List(v) => Value::List(seq(v, budget, visiting)?),
            Node::Tuple(v) => Value::Tuple(seq(v, budget, visiting)?),
            Node::Set(v) => Value::Set(seq(v, budget, visiting)?),
            Node::Dict(items) => {
                let mut out = Vec::with_capacity(items.len());
                for &(k, v) in items {
                    let k = self.materialize(k, depth + 1, budget, visiting)?;
                    let v = self.materialize(v, depth + 1, budget, visiting)?;
                    out.push((k, v));
                }
                Value::Dict(out)
            }
            Node::Global(g) => {
                return Err(PickleError::Malformed {
                    at: 0,
                    reason: format!("result contains the callable {} itself", g.name()),
                })
            }
            Node::TzInfo(_) => {
                return Err(PickleError::Malformed {
                    at: 0,
                    reason: "a bare timezone object is not a supported value".into(),
                })
            }
            Node::PendingUuid => {
                return Err(PickleError::Malformed {
                    at: 0,
                    reason: "uuid.UUID object without BUILD state".into(),
                })
            }
            Node::Object { class, args, state } => {
                let args = seq(args, budget, visiting)?;
                let state = match state {
                    Some(s) => self.materialize(*s, depth + 1, budget, visiting)?,
                    None => Value::None,
                };
                let obj = DataObject::new(*class, args, state);
                // The whole shape, now that BUILD has run (an array without
                // its state, a state of the wrong parts).
                obj.data_class().map_err(|e| PickleError::Malformed {
                    at: 0,
                    reason: e.to_string(),
                })?;
                Value::Object(Box::new(obj))
            }
            Node::Leaf(v) => v.clone(),
        };
        if let Some(s) = visiting.get_mut(id) {
            *s = false;
        }
        Ok(out)
    }
}

// ---- integer helpers ---------------------------------------------------

/// A decimal literal (optional sign, digits, `_` separators) as `Int` or canonical `BigInt`.
fn int_from_decimal(s: &str) -> Option<Value> {
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, s.get(1..)?),
        Some(b'+') => (false, s.get(1..)?),
        _ => (false, s),
    };
    let digits: String = digits.chars().filter(|&c| c != '_').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let trimmed = digits.trim_start_matches('0');
    let trimmed = if trimmed.is_empty() { "0" } else { trimmed };
    let text = if neg && trimmed != "0" {
        format!("-{trimmed}")
    } else {
        trimmed.to_owned()
    };
    Some(match text.parse::<i64>() {
        Ok(i) => Value::Int(i),
        Err(_) => Value::BigInt(text),
    })
}

/// Two's-complement little-endian bytes (`LONG1`/`LONG4`) as `Int` or `BigInt`.
fn int_from_le_twos(b: &[u8]) -> Value {
    let negative = b.last().is_some_and(|&x| x & 0x80 != 0);
    if b.len() <= 8 {
        let fill = if negative { 0xff } else { 0 };
        let mut buf = [fill; 8];
        for (d, s) in buf.iter_mut().zip(b) {
            *d = *s;
        }
        return Value::Int(i64::from_le_bytes(buf));
    }
    // Magnitude, little-endian.
    let mut mag: Vec<u8> = b.to_vec();
    if negative {
        let mut carry = true;
        for x in mag.iter_mut() {
            let (v, c) = (!*x).overflowing_add(u8::from(carry));
            *x = v;
            carry = c;
        }
    }
    // Base 10^9 limbs, little-endian: for each byte from the top, limbs = limbs*256 + byte.
    let mut limbs: Vec<u32> = Vec::new();
    for &byte in mag.iter().rev() {
        let mut carry = u64::from(byte);
        for l in limbs.iter_mut() {
            let v = u64::from(*l) * 256 + carry;
            *l = (v % 1_000_000_000) as u32;
            carry = v / 1_000_000_000;
        }
        while carry > 0 {
            limbs.push((carry % 1_000_000_000) as u32);
            carry /= 1_000_000_000;
        }
    }
    let mut s = String::new();
    if negative {
        s.push('-');
    }
    match limbs.split_last() {
        None => return Value::Int(0),
        Some((top, rest)) => {
            s.push_str(&top.to_string());
            for l in rest.iter().rev() {
                s.push_str(&format!("{l:09}"));
            }
        }
    }
    match s.parse::<i64>() {
        Ok(i) => Value::Int(i),
        Err(_) => Value::BigInt(s),
    }
}

/// A decimal integer text as minimal two's-complement little-endian bytes.
fn le_twos_from_decimal(s: &str) -> Option<Vec<u8>> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut mag: Vec<u8> = Vec::new(); // little-endian base 256
    for d in digits.bytes() {
        let mut carry = u32::from(d - b'0');
        for x in mag.iter_mut() {
            let v = u32::from(*x) * 10 + carry;
            *x = (v & 0xff) as u8;
            carry = v >> 8;
        }
        while carry > 0 {
            mag.push((carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    mag.push(0);
    if neg {
        let mut carry = true;
        for x in mag.iter_mut() {
            let (v, c) = (!*x).overflowing_add(u8::from(carry));
            *x = v;
            carry = c;
        }
    }
    Some(trim_twos(mag))
}

fn trim_twos(mut b: Vec<u8>) -> Vec<u8> {
    while b.len() > 1 {
        let n = b.len();
        let (last, prev) = (b[n - 1], b[n - 2]);
        if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
            b.pop();
        } else {
            break;
        }
    }
    b
}

// ---- string helpers ----------------------------------------------------

/// Python's `raw-unicode-escape` decoding (the `UNICODE` opcode): bytes are
/// Latin-1 except `\uXXXX` / `\UXXXXXXXX` after an odd run of backslashes.
fn raw_unicode_escape(b: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c != b'\\' {
            out.push(char::from(c));
            i += 1;
            continue;
        }
        // Count the run of backslashes.
        let run = b.get(i..)?.iter().take_while(|&&x| x == b'\\').count();
        let after = i + run;
        let esc = b.get(after).copied();
        let digits = match esc {
            Some(b'u') => 4,
            Some(b'U') => 8,
            _ => 0,
        };
        if !run.is_multiple_of(2) && digits > 0 {
            for _ in 0..run - 1 {
                out.push('\\');
            }
            let hex = b.get(after + 1..after + 1 + digits)?;
            let hex = std::str::from_utf8(hex).ok()?;
            let cp = u32::from_str_radix(hex, 16).ok()?;
            out.push(char::from_u32(cp)?);
            i = after + 1 + digits;
        } else {
            for _ in 0..run {
                out.push('\\');
            }
            i = after;
        }
    }
    Some(out)
}

/// Python's `codecs.escape_decode` (the `STRING` opcode's repr escapes).
fn escape_decode(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let e = *b.get(i)?;
        i += 1;
        match e {
            b'\\' => out.push(b'\\'),
            b'\'' => out.push(b'\''),
            b'"' => out.push(b'"'),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'v' => out.push(0x0b),
            b'\n' => {}
            b'x' => {
                let h = std::str::from_utf8(b.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match b.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    Some(out)
}

fn is_decimal_text(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 10_000
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_'))
}

// ---- datetime helpers ----------------------------------------------------

fn date_from_ymd(y: i64, m: i64, d: i64) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(
        i32::try_from(y).ok()?,
        u32::try_from(m).ok()?,
        u32::try_from(d).ok()?,
    )
}

fn hms_micro(h: i64, mi: i64, s: i64, us: i64) -> Option<NaiveTime> {
    if !(0..1_000_000).contains(&us) {
        return None;
    }
    NaiveTime::from_hms_micro_opt(
        u32::try_from(h).ok()?,
        u32::try_from(mi).ok()?,
        u32::try_from(s).ok()?,
        u32::try_from(us).ok()?,
    )
}

/// CPython's datetime pickle state: year (2 bytes BE), month (high bit = fold),
/// day, hour, minute, second, microsecond (3 bytes BE).
fn datetime_from_state(b: &[u8]) -> Option<NaiveDateTime> {
    let [y1, y2, mo, d, h, mi, s, u1, u2, u3] = <[u8; 10]>::try_from(b).ok()?;
    let date = date_from_ymd(
        i64::from(u16::from_be_bytes([y1, y2])),
        i64::from(mo & 0x7f),
        i64::from(d),
    )?;
    let us = (u32::from(u1) << 16) | (u32::from(u2) << 8) | u32::from(u3);
    let time = hms_micro(h.into(), mi.into(), s.into(), us.into())?;
    Some(NaiveDateTime::new(date, time))
}

fn datetime_from_ints(v: &[i64]) -> Option<NaiveDateTime> {
    let g = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(NaiveDateTime::new(
        date_from_ymd(g(0), g(1), g(2))?,
        hms_micro(g(3), g(4), g(5), g(6))?,
    ))
}

fn date_from_state(b: &[u8]) -> Option<NaiveDate> {
    let [y1, y2, m, d] = <[u8; 4]>::try_from(b).ok()?;
    date_from_ymd(i64::from(u16::from_be_bytes([y1, y2])), m.into(), d.into())
}

/// Time state: hour (high bit = fold), minute, second, microsecond (3 bytes BE).
fn time_from_state(b: &[u8]) -> Option<NaiveTime> {
    let [h, mi, s, u1, u2, u3] = <[u8; 6]>::try_from(b).ok()?;
    let us = (u32::from(u1) << 16) | (u32::from(u2) << 8) | u32::from(u3);
    hms_micro(i64::from(h & 0x7f), mi.into(), s.into(), us.into())
}

/// `timedelta(days, seconds, microseconds)` normalized as Python does.
fn timedelta_normalized(days: i64, seconds: i64, micros: i64) -> Option<Value> {
    let total =
        i128::from(days) * 86_400_000_000 + i128::from(seconds) * 1_000_000 + i128::from(micros);
    let day_us: i128 = 86_400_000_000;
    let d = total.div_euclid(day_us);
    let rem = total.rem_euclid(day_us);
    if d.abs() > 999_999_999 {
        return None;
    }
    Some(Value::TimeDelta {
        days: i64::try_from(d).ok()?,
        seconds: i64::try_from(rem / 1_000_000).ok()?,
        microseconds: i64::try_from(rem % 1_000_000).ok()?,
    })
}

// ---- encoder -------------------------------------------------------------

/// Encodes a plain [`Value`] as a protocol-4 pickle (unframed, no memo) that
/// CPython's `pickle.loads` reads back to the equal Python value. Used where
/// a Python client unpickles what the worker wrote (the mongodb and database
/// result backends, pickle-serialized rpc replies).
///
/// `Set` becomes a `set`; `Bytes` becomes `bytes`. Nesting depth is the
/// caller's: values from this crate's decoders are bounded by their limits.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = vec![PROTO, 4];
    encode_into(v, &mut out);
    out.push(STOP);
    out
}

/// A call `module.name(*args)` written in place of a value: what pickle
/// writes for an object whose `__reduce__` returns `(cls, args)`, e.g. an
/// exception instance (`BaseException.__reduce__`). Python's unpickler
/// imports `module.name` and calls it; this crate's decoder refuses any such
/// global outside its allow-list, so only callers that know the reader can
/// import the class should build one (see
/// [`super::result_codec`] for Celery exceptions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reduce<'a> {
    module: &'a str,
    name: &'a str,
    args: &'a [Value],
}

impl<'a> Reduce<'a> {
    /// `module.name(*args)`, or `None` when `module` is not a dotted ASCII
    /// name or `name` not a plain ASCII identifier: pickle's `GLOBAL` opcode
    /// is newline-terminated text, so anything else could not be written
    /// faithfully (or would smuggle in further opcodes).
    pub fn new(module: &'a str, name: &'a str, args: &'a [Value]) -> Option<Self> {
        let word =
            |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        (word(name) && module.split('.').all(word)).then_some(Reduce { module, name, args })
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        put_global(out, self.module, self.name);
        encode_into(&Value::Tuple(self.args.to_vec()), out);
        out.push(REDUCE);
    }
}

/// Encodes one [`Reduce`] call as a whole pickle, framed like [`encode`].
pub fn encode_reduce(call: &Reduce<'_>) -> Vec<u8> {
    let mut out = vec![PROTO, 4];
    call.encode_into(&mut out);
    out.push(STOP);
    out
}

/// What [`encode_dict_with`] writes in place of a value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Written<'a> {
    /// A call, see [`Reduce`].
    Call(Reduce<'a>),
    /// The body of a whole pickle someone else wrote (see [`pickle_body`]).
    Pickled(&'a [u8]),
}

/// The opcodes of a whole pickle (`PROTO n … STOP`) without its `PROTO`
/// header and final `STOP`, so it can stand for one value inside another
/// pickle: our encoder writes no memo, so the embedded pickle's memo indices
/// stay its own, and a `FRAME` inside is only a read-ahead hint to CPython's
/// unpickler. `None` when `whole` does not look like a protocol 2–5 pickle.
pub fn pickle_body(whole: &[u8]) -> Option<&[u8]> {
    match whole {
        [PROTO, 2..=5, body @ .., STOP] if !body.is_empty() => Some(body),
        _ => None,
    }
}

/// Encodes a dict exactly as [`encode`] encodes `Value::Dict(items)`, except
/// that each value for which `write_for(key, value)` returns a [`Written`] is
/// written as that instead.
pub fn encode_dict_with<'v>(
    items: &'v [(Value, Value)],
    write_for: impl Fn(&'v Value, &'v Value) -> Option<Written<'v>>,
) -> Vec<u8> {
    let mut out = vec![PROTO, 4, EMPTY_DICT];
    for chunk in items.chunks(1000) {
        out.push(MARK);
        for (k, v) in chunk {
            encode_into(k, &mut out);
            match write_for(k, v) {
                Some(Written::Call(call)) => call.encode_into(&mut out),
                Some(Written::Pickled(body)) => out.extend_from_slice(body),
                None => encode_into(v, &mut out),
            }
        }
        out.push(SETITEMS);
    }
    out.push(STOP);
    out
}

fn put_global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(GLOBAL);
    out.extend_from_slice(module.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    if let Ok(n) = u8::try_from(b.len()) {
        out.push(SHORT_BINUNICODE);
        out.push(n);
    } else if let Ok(n) = u32::try_from(b.len()) {
        out.push(BINUNICODE);
        out.extend_from_slice(&n.to_le_bytes());
    } else {
        out.push(BINUNICODE8);
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(b);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    if let Ok(n) = u8::try_from(b.len()) {
        out.push(SHORT_BINBYTES);
        out.push(n);
    } else if let Ok(n) = u32::try_from(b.len()) {
        out.push(BINBYTES);
        out.extend_from_slice(&n.to_le_bytes());
    } else {
        out.push(BINBYTES8);
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(b);
}

fn put_long_bytes(out: &mut Vec<u8>, b: &[u8]) {
    if let Ok(n) = u8::try_from(b.len()) {
        out.push(LONG1);
        out.push(n);
    } else {
        out.push(LONG4);
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(b);
}

fn put_int(out: &mut Vec<u8>, i: i64) {
    if let Ok(u) = u8::try_from(i) {
        out.push(BININT1);
        out.push(u);
    } else if let Ok(u) = u16::try_from(i) {
        out.push(BININT2);
        out.extend_from_slice(&u.to_le_bytes());
    } else if let Ok(s) = i32::try_from(i) {
        out.push(BININT);
        out.extend_from_slice(&s.to_le_bytes());
    } else {
        put_long_bytes(out, &trim_twos(i.to_le_bytes().to_vec()));
    }
}

fn put_tz(out: &mut Vec<u8>, offset: i32) {
    put_global(out, "datetime", "timezone");
    put_global(out, "datetime", "timedelta");
    let off = i64::from(offset);
    put_int(out, off.div_euclid(86_400));
    put_int(out, off.rem_euclid(86_400));
    put_int(out, 0);
    out.push(TUPLE3);
    out.push(REDUCE);
    out.push(TUPLE1);
    out.push(REDUCE);
}

fn encode_into(v: &Value, out: &mut Vec<u8>) {
    use chrono::{Datelike, Timelike};
    match v {
        Value::None => out.push(NONE),
        Value::Bool(true) => out.push(NEWTRUE),
        Value::Bool(false) => out.push(NEWFALSE),
        Value::Int(i) => put_int(out, *i),
        Value::BigInt(s) => match le_twos_from_decimal(s) {
            Some(b) => put_long_bytes(out, &b),
            // Not a decimal integer: keep the text rather than lose it.
            None => put_str(out, s),
        },
        Value::Float(f) => {
            out.push(BINFLOAT);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => put_str(out, s),
        Value::Bytes(b) => put_bytes(out, b),
        Value::List(items) => {
            out.push(EMPTY_LIST);
            for chunk in items.chunks(1000) {
                out.push(MARK);
                for i in chunk {
                    encode_into(i, out);
                }
                out.push(APPENDS);
            }
        }
        Value::Tuple(items) => match items.as_slice() {
            [] => out.push(EMPTY_TUPLE),
            [a] => {
                encode_into(a, out);
                out.push(TUPLE1);
            }
            [a, b] => {
                encode_into(a, out);
                encode_into(b, out);
                out.push(TUPLE2);
            }
            [a, b, c] => {
                encode_into(a, out);
                encode_into(b, out);
                encode_into(c, out);
                out.push(TUPLE3);
            }
            _ => {
                out.push(MARK);
                for i in items {
                    encode_into(i, out);
                }
                out.push(TUPLE);
            }
        },
        Value::Set(items) => {
            out.push(EMPTY_SET);
            for chunk in items.chunks(1000) {
                out.push(MARK);
                for i in chunk {
                    encode_into(i, out);
                }
                out.push(ADDITEMS);
            }
        }
        Value::Dict(items) => {
            out.push(EMPTY_DICT);
            for chunk in items.chunks(1000) {
                out.push(MARK);
                for (k, v) in chunk {
                    encode_into(k, out);
                    encode_into(v, out);
                }
                out.push(SETITEMS);
            }
        }
        Value::DateTime {
            naive,
            offset_seconds,
        } => {
            put_global(out, "datetime", "datetime");
            let y = u16::try_from(naive.year()).unwrap_or(1).to_be_bytes();
            let us = (naive.nanosecond() / 1000).min(999_999);
            let state = [
                y[0],
                y[1],
                naive.month() as u8,
                naive.day() as u8,
                naive.hour() as u8,
                naive.minute() as u8,
                naive.second().min(59) as u8,
                (us >> 16) as u8,
                (us >> 8) as u8,
                us as u8,
            ];
            put_bytes(out, &state);
            match offset_seconds {
                Some(off) => {
                    put_tz(out, *off);
                    out.push(TUPLE2);
                }
                None => out.push(TUPLE1),
            }
            out.push(REDUCE);
        }
        Value::Date(d) => {
            put_global(out, "datetime", "date");
            let y = u16::try_from(d.year()).unwrap_or(1).to_be_bytes();
            put_bytes(out, &[y[0], y[1], d.month() as u8, d.day() as u8]);
            out.push(TUPLE1);
            out.push(REDUCE);
        }
        Value::Time(t) => {
            put_global(out, "datetime", "time");
            let us = (t.nanosecond() / 1000).min(999_999);
            put_bytes(
                out,
                &[
                    t.hour() as u8,
                    t.minute() as u8,
                    t.second().min(59) as u8,
                    (us >> 16) as u8,
                    (us >> 8) as u8,
                    us as u8,
                ],
            );
            out.push(TUPLE1);
            out.push(REDUCE);
        }
        Value::TimeDelta {
            days,
            seconds,
            microseconds,
        } => {
            put_global(out, "datetime", "timedelta");
            put_int(out, *days);
            put_int(out, *seconds);
            put_int(out, *microseconds);
            out.push(TUPLE3);
            out.push(REDUCE);
        }
        Value::Decimal(s) => {
            put_global(out, "decimal", "Decimal");
            put_str(out, s);
            out.push(TUPLE1);
            out.push(REDUCE);
        }
        Value::Uuid(u) => {
            put_global(out, "uuid", "UUID");
            out.push(EMPTY_TUPLE);
            out.push(NEWOBJ);
            out.push(EMPTY_DICT);
            put_str(out, "int");
            match le_twos_from_decimal(&u.as_u128().to_string()) {
                Some(b) => put_long_bytes(out, &b),
                None => put_int(out, 0),
            }
            out.push(SETITEM);
            out.push(BUILD);
        }
        Value::Object(o) => encode_object(o, out),
    }
}

/// A [`DataObject`] in the shape CPython loads back to an equal object:
///
/// * `signature`: `celery.canvas.signature(dict)` via `REDUCE`, exactly
///   what `Signature.__reduce__` writes (CPython rebuilds the right canvas
///   class from the dict's `subtask_type`).
/// * `PassthroughDataset`: `copyreg._reconstructor(cls, str, name)` then
///   `BUILD` with the state. This is CPython's own protocol 0–1 shape, not
///   protocol 2's `NEWOBJ`, because `PassthroughDataset.__new__` ignores
///   its argument and mints a fresh `./system/passthrough/<uuid>` name:
///   through `NEWOBJ` the loaded object would not equal the one sent,
///   through `str.__new__` it keeps its name.
///
/// An object that is not a valid data-class shape (only ever built by hand)
/// is written as its plain view ([`DataObject::plain`]), so the encoder never
/// names a global outside the data-class list.
fn encode_object(o: &DataObject, out: &mut Vec<u8>) {
    let Ok(class) = o.data_class() else {
        encode_into(&o.plain(), out);
        return;
    };
    let (module, name) = class.module_and_name();
    let arg = o.args.first().unwrap_or(&Value::None);
    match class {
        DataClass::CelerySignature => {
            put_global(out, module, name);
            encode_into(arg, out);
            out.push(TUPLE1);
            out.push(REDUCE);
        }
        DataClass::Range | DataClass::NumpyDtype | DataClass::NumpyScalar => {
            put_global(out, module, name);
            encode_into(&Value::Tuple(o.args.clone()), out);
            out.push(REDUCE);
            if !o.state.is_none() {
                encode_into(&o.state, out);
                out.push(BUILD);
            }
        }
        DataClass::NdArray => {
            put_global(out, module, name);
            put_global(out, "numpy", "ndarray");
            encode_into(&Value::Tuple(vec![Value::Int(0)]), out);
            encode_into(&Value::Bytes(b"b".to_vec()), out);
            out.push(TUPLE3);
            out.push(REDUCE);
            encode_into(&o.state, out);
            out.push(BUILD);
        }
        DataClass::PassthroughDataset => {
            put_global(out, "copyreg", "_reconstructor");
            put_global(out, module, name);
            put_global(out, "builtins", "str");
            encode_into(arg, out);
            out.push(TUPLE3);
            out.push(REDUCE);
            if !o.state.is_none() {
                encode_into(&o.state, out);
                out.push(BUILD);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_ints_round_trip_through_twos_complement() {
        for s in [
            "0",
            "1",
            "-1",
            "127",
            "128",
            "-128",
            "-129",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775809",
            "1000000000000000000000000000000",
            "-1000000000000000000000000000000",
        ] {
            let b = le_twos_from_decimal(s).expect("decimal");
            let v = int_from_le_twos(&b);
            let back = match v {
                Value::Int(i) => i.to_string(),
                Value::BigInt(t) => t,
                other => panic!("{other:?}"),
            };
            assert_eq!(back, s);
        }
    }

    #[test]
    fn raw_unicode_escape_follows_backslash_parity() {
        assert_eq!(raw_unicode_escape(br"a\u00fcb").as_deref(), Some("aüb"));
        assert_eq!(
            raw_unicode_escape(br"a\\u00fc").as_deref(),
            Some(r"a\\u00fc")
        );
        assert_eq!(raw_unicode_escape(br"\U0001f600").as_deref(), Some("😀"));
        assert_eq!(raw_unicode_escape(br"\u12"), None);
    }

    #[test]
    fn encode_decode_round_trip() {
        let v = Value::Tuple(vec![
            Value::List(vec![
                Value::Str("x".into()),
                Value::Int(-5),
                Value::Int(1 << 40),
            ]),
            Value::dict([("a", Value::Float(1.5)), ("b", Value::Bytes(vec![0, 255]))]),
            Value::Set(vec![Value::Int(1)]),
            Value::BigInt("123456789012345678901234567890".into()),
            Value::Uuid(uuid::Uuid::from_u128(
                0x1234_5678_1234_5678_1234_5678_1234_5678,
            )),
            Value::Decimal("1.10".into()),
        ]);
        assert_eq!(decode(&encode(&v)), Ok(v));
    }

    #[test]
    fn reduce_names_must_be_writable_as_a_global() {
        let args = [Value::from("x")];
        assert!(Reduce::new("celery.exceptions", "NotRegistered", &args).is_some());
        for (module, name) in [
            ("builtins", ""),
            ("builtins", "A.B"),
            ("builtins", "A\nB"),
            ("", "A"),
            ("a..b", "A"),
            ("os\nsystem", "A"),
        ] {
            assert!(
                Reduce::new(module, name, &args).is_none(),
                "{module:?} {name:?}"
            );
        }
        let call = Reduce::new("builtins", "ValueError", &args).expect("plain names");
        // GLOBAL `builtins\nValueError\n`, ('x',), REDUCE.
        assert_eq!(
            encode_reduce(&call),
            b"\x80\x04cbuiltins\nValueError\n\x8c\x01x\x85R.".to_vec()
        );
    }

    /// `range` as protocols 0, 2 (`__builtin__.xrange`) and 4 write it, a
    /// negative step, the round trip through the encoder, and the refusals.
    #[test]
    fn range_is_data() {
        let range = |a: i64, b: i64, c: i64| {
            Value::Object(Box::new(DataObject::new(
                DataClass::Range,
                vec![Value::Int(a), Value::Int(b), Value::Int(c)],
                Value::None,
            )))
        };
        let expected = Value::dict([("n", range(1, 8, 1))]);
        for bytes in [
            &b"(dp0\nVn\np1\nc__builtin__\nxrange\np2\n(I1\nI8\nI1\ntp3\nRp4\ns."[..],
            &b"\x80\x02}q\x00X\x01\x00\x00\x00nq\x01c__builtin__\nxrange\nq\x02K\x01K\x08K\x01\x87q\x03Rq\x04s."[..],
            &b"\x80\x04\x95'\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01n\x94\x8c\x08builtins\x94\x8c\x05range\x94\x93\x94K\x01K\x08K\x01\x87\x94R\x94s."[..],
        ] {
            assert_eq!(decode(bytes).expect("range"), expected);
        }
        let negative = decode(b"\x80\x02c__builtin__\nxrange\nq\x00K\x05J\xfb\xff\xff\xffJ\xfe\xff\xff\xff\x87q\x01Rq\x02.")
            .expect("range");
        assert_eq!(negative, range(5, -5, -2));
        assert_eq!(negative.repr(), "range(5, -5, -2)");
        assert_eq!(expected.repr(), "{'n': range(1, 8)}");
        assert_eq!(decode(&encode(&expected)).expect("round trip"), expected);
        for bad in [
            &b"\x80\x02c__builtin__\nxrange\nK\x01K\x08K\x00\x87R."[..], // step 0
            &b"\x80\x02c__builtin__\nxrange\nK\x01K\x08\x86R."[..],      // two args
            &b"\x80\x02c__builtin__\nxrange\nX\x01\x00\x00\x00aK\x08K\x01\x87R."[..], // a str
        ] {
            assert!(
                matches!(decode(bad), Err(PickleError::BadCall { .. })),
                "{bad:?}"
            );
        }
    }

    /// numpy arrays and scalars as numpy pickles them (protocols 2 and 4,
    /// numpy 2's `numpy._core`), kept as data and written back the same way.
    #[test]
    fn numpy_arrays_and_scalars_are_data() {
        let f2: &[u8] = b"\x80\x02cnumpy._core.multiarray\x0a_reconstruct\x0aq\x00cnumpy\x0andarray\x0aq\x01K\x00\x85q\x02c_codecs\x0aencode\x0aq\x03X\x01\x00\x00\x00bq\x04X\x06\x00\x00\x00latin1q\x05\x86q\x06Rq\x07\x87q\x08Rq\x09(K\x01K\x02K\x02\x86q\x0acnumpy\x0adtype\x0aq\x0bX\x02\x00\x00\x00f8q\x0c\x89\x88\x87q\x0dRq\x0e(K\x03X\x01\x00\x00\x00<q\x0fNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x10b\x89h\x03X!\x00\x00\x00\x00\x00\x00\x00\x00\x00\xc3\xb8?\x00\x00\x00\x00\x00\x00\x00@\x00\x00\x00\x00\x00\x00\x08@\x00\x00\x00\x00\x00\x00\x10@q\x11h\x05\x86q\x12Rq\x13tq\x14b.";
        let i4: &[u8] = b"\x80\x04\x95\xa1\x00\x00\x00\x00\x00\x00\x00\x8c\x16numpy._core.multiarray\x94\x8c\x0c_reconstruct\x94\x93\x94\x8c\x05numpy\x94\x8c\x07ndarray\x94\x93\x94K\x00\x85\x94C\x01b\x94\x87\x94R\x94(K\x01K\x03\x85\x94h\x03\x8c\x05dtype\x94\x93\x94\x8c\x02i8\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01<\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b\x89C\x18\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x94t\x94b.";
        let o2: &[u8] = b"\x80\x02cnumpy._core.multiarray\x0a_reconstruct\x0aq\x00cnumpy\x0andarray\x0aq\x01K\x00\x85q\x02c_codecs\x0aencode\x0aq\x03X\x01\x00\x00\x00bq\x04X\x06\x00\x00\x00latin1q\x05\x86q\x06Rq\x07\x87q\x08Rq\x09(K\x01K\x02\x85q\x0acnumpy\x0adtype\x0aq\x0bX\x02\x00\x00\x00O8q\x0c\x89\x88\x87q\x0dRq\x0e(K\x03X\x01\x00\x00\x00|q\x0fNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tq\x10b\x89]q\x11(K\x01X\x01\x00\x00\x00aq\x12etq\x13b.";
        let s2: &[u8] = b"\x80\x02cnumpy._core.multiarray\x0ascalar\x0aq\x00cnumpy\x0adtype\x0aq\x01X\x02\x00\x00\x00f8q\x02\x89\x88\x87q\x03Rq\x04(K\x03X\x01\x00\x00\x00<q\x05NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x06bc_codecs\x0aencode\x0aq\x07X\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x04@q\x08X\x06\x00\x00\x00latin1q\x09\x86q\x0aRq\x0b\x86q\x0cRq\x0d.";
        let dtype = |name: &str, order: &str, flags: i64| {
            Value::Object(Box::new(DataObject::new(
                DataClass::NumpyDtype,
                vec![Value::from(name), Value::Bool(false), Value::Bool(true)],
                Value::Tuple(vec![
                    Value::Int(3),
                    Value::from(order),
                    Value::None,
                    Value::None,
                    Value::None,
                    Value::Int(-1),
                    Value::Int(-1),
                    Value::Int(flags),
                ]),
            )))
        };
        let array = |shape: Vec<i64>, dt: Value, data: Value| {
            Value::Object(Box::new(DataObject::new(
                DataClass::NdArray,
                vec![],
                Value::Tuple(vec![
                    Value::Int(1),
                    Value::Tuple(shape.into_iter().map(Value::Int).collect()),
                    dt,
                    Value::Bool(false),
                    data,
                ]),
            )))
        };
        let floats: Vec<u8> = [1.5f64, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let ints: Vec<u8> = [1i64, 2, 3].iter().flat_map(|i| i.to_le_bytes()).collect();
        let cases = [
            (
                f2,
                array(vec![2, 2], dtype("f8", "<", 0), Value::Bytes(floats)),
            ),
            (i4, array(vec![3], dtype("i8", "<", 0), Value::Bytes(ints))),
            (
                o2,
                array(
                    vec![2],
                    dtype("O8", "|", 63),
                    Value::List(vec![Value::Int(1), Value::from("a")]),
                ),
            ),
            (
                s2,
                Value::Object(Box::new(DataObject::new(
                    DataClass::NumpyScalar,
                    vec![
                        dtype("f8", "<", 0),
                        Value::Bytes(2.5f64.to_le_bytes().to_vec()),
                    ],
                    Value::None,
                ))),
            ),
        ];
        for (bytes, expected) in cases {
            let got = decode(bytes).expect("numpy decodes");
            assert_eq!(got, expected);
            assert_eq!(decode(&encode(&got)).expect("round trip"), expected);
        }
        // An array without its state, or an ndarray global used on its own, is refused.
        assert!(decode(
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R."
        )
        .is_err());
        assert!(matches!(
            decode(b"\x80\x02cnumpy\nndarray\n)R."),
            Err(PickleError::BadCall { .. })
        ));
        // Anything else of numpy's stays forbidden.
        assert!(matches!(
            decode(b"\x80\x02cnumpy\nload\n."),
            Err(PickleError::ForbiddenGlobal { .. })
        ));
    }

    #[test]
    fn encode_dict_with_no_calls_is_encode() {
        for n in [0_i64, 1, 6, 1000, 1001, 2500] {
            let items: Vec<(Value, Value)> =
                (0..n).map(|i| (Value::Int(i), Value::Int(-i))).collect();
            assert_eq!(
                encode_dict_with(&items, |_, _| None),
                encode(&Value::Dict(items.clone())),
                "{n} items"
            );
        }
        let items = vec![
            (Value::from("e"), Value::None),
            (Value::from("k"), Value::Int(1)),
        ];
        let args = [Value::Int(7)];
        let with_call = encode_dict_with(&items, |k, _| {
            (k.as_str() == Some("e"))
                .then(|| Reduce::new("builtins", "KeyError", &args))
                .flatten()
                .map(Written::Call)
        });
        assert_eq!(
            with_call,
            b"\x80\x04}(\x8c\x01ecbuiltins\nKeyError\nK\x07\x85R\x8c\x01kK\x01u.".to_vec()
        );
    }
}
