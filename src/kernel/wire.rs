//! Jupyter messaging wire format (protocol 5.x) on top of ZeroMQ multipart frames.
//!
//! We keep message parts as `serde_json::Value` instead of typed structs: the executor copies
//! kernel output (mime bundles, metadata, transient fields) into the notebook verbatim, exactly
//! like nbclient does with its dicts, and a typed model would drop or reshape fields it does
//! not know. Everything arriving here is outside input: decoding never panics, and a bad frame
//! (no delimiter, bad HMAC, invalid JSON) is an error the caller logs and skips.

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;

/// The frame separating routing identities from the signed message.
pub const DELIMITER: &[u8] = b"<IDS|MSG>";

/// Messaging protocol version we speak (what ipykernel 6/7 and jupyter_client 8 use).
pub const PROTOCOL_VERSION: &str = "5.3";

/// Why a multipart message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// No `<IDS|MSG>` frame.
    #[error("message has no <IDS|MSG> delimiter")]
    MissingDelimiter,
    /// Fewer than signature + 4 JSON frames after the delimiter.
    #[error("message has {0} frames after the delimiter, need at least 5")]
    TooFewFrames(usize),
    /// The HMAC does not match (or is not hex).
    #[error("message signature is invalid")]
    BadSignature,
    /// A JSON frame does not parse.
    #[error("message frame is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A header/metadata frame is larger than any kernel sends.
    #[error("message {0} frame of {1} bytes is over the size limit")]
    Oversized(&'static str, usize),
    /// An oversized content frame is not a JSON object.
    #[error("oversized message content is not a JSON object (at byte {0})")]
    BadContent(usize),
}

/// HMAC-SHA256 signer for one connection (key from the connection file).
#[derive(Clone)]
pub struct Signer {
    key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Signer")
            .field("enabled", &self.key.is_some())
            .finish()
    }
}

impl Signer {
    /// A signer for `key`; an empty key disables signing (allowed by the protocol, never used by
    /// our launcher).
    pub fn new(key: &str) -> Self {
        Signer {
            key: (!key.is_empty()).then(|| key.as_bytes().to_vec()),
        }
    }

    fn mac(&self, parts: &[&[u8]]) -> Option<Hmac<Sha256>> {
        let key = self.key.as_ref()?;
        // new_from_slice only fails for invalid key lengths, which HMAC does not have.
        let mut mac = Hmac::<Sha256>::new_from_slice(key).ok()?;
        for p in parts {
            mac.update(p);
        }
        Some(mac)
    }

    /// Hex signature over header, parent header, metadata and content.
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        match self.mac(parts) {
            Some(mac) => hex(&mac.finalize().into_bytes()),
            None => String::new(),
        }
    }

    /// Constant-time verification of a hex signature.
    pub fn verify(&self, parts: &[&[u8]], signature: &[u8]) -> bool {
        let Some(mac) = self.mac(parts) else {
            return true;
        };
        match unhex(signature) {
            Some(sig) => mac.verify_slice(&sig).is_ok(),
            None => false,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nib = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    s.chunks(2)
        .map(|pair| Some(nib(pair[0])? << 4 | nib(pair[1])?))
        .collect()
}

/// One Jupyter message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `header` (msg_id, msg_type, session, date, …).
    pub header: Value,
    /// `parent_header` (`{}` when none).
    pub parent_header: Value,
    /// `metadata`.
    pub metadata: Value,
    /// `content`.
    pub content: Value,
    /// Binary buffers (comm messages); kept but unused by the executor.
    pub buffers: Vec<Vec<u8>>,
}

impl Message {
    /// A new request with a fresh msg_id and the current UTC date.
    pub fn new(msg_type: &str, content: Value, session: &str) -> Self {
        Message {
            header: json!({
                "msg_id": uuid::Uuid::new_v4().simple().to_string(),
                "msg_type": msg_type,
                "session": session,
                "username": "om-worker",
                "date": Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
                "version": PROTOCOL_VERSION,
            }),
            parent_header: Value::Object(Map::new()),
            metadata: Value::Object(Map::new()),
            content,
            buffers: Vec::new(),
        }
    }

    /// `header.msg_type` ("" if missing).
    pub fn msg_type(&self) -> &str {
        self.header
            .get("msg_type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// `header.msg_id` ("" if missing).
    pub fn msg_id(&self) -> &str {
        self.header
            .get("msg_id")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// `parent_header.msg_id`, if any.
    pub fn parent_msg_id(&self) -> Option<&str> {
        self.parent_header.get("msg_id").and_then(Value::as_str)
    }

    /// `header.date` parsed (kernels send ISO 8601, normally UTC with `Z`).
    pub fn date(&self) -> Option<DateTime<Utc>> {
        let s = self.header.get("date")?.as_str()?;
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The timestamp nbclient records in `metadata.execution` for this message:
    /// `header.date` formatted `%Y-%m-%dT%H:%M:%S.%fZ`, or now when the date is unusable
    /// (nbclient's fallback too).
    pub fn nbclient_timestamp(&self) -> String {
        format_timestamp(self.date().unwrap_or_else(Utc::now))
    }

    /// Encodes into ZeroMQ frames (no routing identities: we are always the DEALER/SUB side).
    pub fn to_frames(&self, signer: &Signer) -> Vec<Vec<u8>> {
        let parts: [Vec<u8>; 4] = [
            json_bytes(&self.header),
            json_bytes(&self.parent_header),
            json_bytes(&self.metadata),
            json_bytes(&self.content),
        ];
        let sig = signer.sign(&[&parts[0], &parts[1], &parts[2], &parts[3]]);
        let mut frames = Vec::with_capacity(6 + self.buffers.len());
        frames.push(DELIMITER.to_vec());
        frames.push(sig.into_bytes());
        frames.extend(parts);
        frames.extend(self.buffers.iter().cloned());
        frames
    }

    /// Decodes ZeroMQ frames (identities before the delimiter are ignored).
    pub fn from_frames<B: AsRef<[u8]>>(frames: &[B], signer: &Signer) -> Result<Self, WireError> {
        Self::from_frames_capped(frames, signer, usize::MAX)
    }

    /// [`Message::from_frames`] with a bound on what is built from the frames: a content frame
    /// over `max_content` bytes is not parsed into a `Value` as a whole (that costs about twice
    /// its size again, on top of the frame) but cut down while scanning it: its large strings
    /// (a stream's `text`, an error's `evalue`) keep their first `max_content` bytes plus a
    /// note, a large `data` bundle or `traceback` is replaced by a short notice, other large
    /// values are left out (see [`oversized_content`]). Header, parent header and metadata
    /// frames over `max_content` (at least 64 KiB) make the message an error
    /// ([`WireError::Oversized`]);
    /// binary buffers are dropped when they are over it in total (the executor does not
    /// use them).
    pub fn from_frames_capped<B: AsRef<[u8]>>(
        frames: &[B],
        signer: &Signer,
        max_content: usize,
    ) -> Result<Self, WireError> {
        let delim = frames
            .iter()
            .position(|f| f.as_ref() == DELIMITER)
            .ok_or(WireError::MissingDelimiter)?;
        let rest = &frames[delim + 1..];
        if rest.len() < 5 {
            return Err(WireError::TooFewFrames(rest.len()));
        }
        let parts = [
            rest[1].as_ref(),
            rest[2].as_ref(),
            rest[3].as_ref(),
            rest[4].as_ref(),
        ];
        if !signer.verify(&parts, rest[0].as_ref()) {
            return Err(WireError::BadSignature);
        }
        for (what, part) in [
            ("header", parts[0]),
            ("parent header", parts[1]),
            ("metadata", parts[2]),
        ] {
            if part.len() > max_content.max(SMALL_VALUE) {
                return Err(WireError::Oversized(what, part.len()));
            }
        }
        let header = object_or_empty(serde_json::from_slice(parts[0])?);
        let content = if parts[3].len() > max_content {
            let msg_type = header.get("msg_type").and_then(Value::as_str).unwrap_or("");
            oversized_content(msg_type, parts[3], max_content)?
        } else {
            object_or_empty(serde_json::from_slice(parts[3])?)
        };
        let buffers = &rest[5..];
        let buffer_bytes: usize = buffers.iter().map(|b| b.as_ref().len()).sum();
        Ok(Message {
            header,
            parent_header: object_or_empty(serde_json::from_slice(parts[1])?),
            metadata: object_or_empty(serde_json::from_slice(parts[2])?),
            content,
            buffers: if buffer_bytes > max_content {
                Vec::new()
            } else {
                buffers.iter().map(|b| b.as_ref().to_vec()).collect()
            },
        })
    }
}

/// Values up to this size in an oversized content frame are parsed as they are.
const SMALL_VALUE: usize = 64 * 1024;

/// The content of a message whose content frame (`raw`) is over `max` bytes, built without
/// parsing `raw` as a whole: one pass over its top-level members; members up to
/// [`SMALL_VALUE`] bytes are kept as they are, a large string keeps its first `max` bytes and
/// a note saying how large it was (the executor then truncates it with its visible marker), a
/// large `data` (display_data / execute_result mime bundle) becomes a `text/plain` notice, a
/// large `traceback` a one-line notice, any other large member is left out. Peak memory is
/// about `max` beyond the frame itself.
pub fn oversized_content(msg_type: &str, raw: &[u8], max: usize) -> Result<Value, WireError> {
    let mut out = Map::new();
    let mut i = skip_ws(raw, 0);
    if raw.get(i) != Some(&b'{') {
        return Err(WireError::BadContent(i));
    }
    i = skip_ws(raw, i + 1);
    if raw.get(i) == Some(&b'}') {
        return Ok(Value::Object(out));
    }
    loop {
        if raw.get(i) != Some(&b'"') {
            return Err(WireError::BadContent(i));
        }
        let key_end = skip_value(raw, i).ok_or(WireError::BadContent(i))?;
        let key: String = serde_json::from_slice(&raw[i..key_end])?;
        i = skip_ws(raw, key_end);
        if raw.get(i) != Some(&b':') {
            return Err(WireError::BadContent(i));
        }
        let start = skip_ws(raw, i + 1);
        let end = skip_value(raw, start).ok_or(WireError::BadContent(start))?;
        let span = &raw[start..end];
        let notice = format!(
            "[om-worker: {msg_type} {key} of {} bytes omitted: over the {max}-byte message limit]",
            span.len()
        );
        if span.len() <= SMALL_VALUE.min(max) {
            out.insert(key, serde_json::from_slice(span)?);
        } else if span.first() == Some(&b'"') {
            let mut text = string_prefix(&span[1..span.len() - 1], max)?;
            text.push_str(&format!(
                "\n... [om-worker: {msg_type} {key} of {} bytes cut to its first {max} bytes]\n",
                span.len()
            ));
            out.insert(key, Value::String(text));
        } else if key == "data" {
            out.insert(key, json!({ "text/plain": notice }));
        } else if key == "traceback" {
            out.insert(key, json!([notice]));
        }
        i = skip_ws(raw, end);
        match raw.get(i) {
            Some(b',') => i = skip_ws(raw, i + 1),
            Some(b'}') => return Ok(Value::Object(out)),
            _ => return Err(WireError::BadContent(i)),
        }
    }
}

fn skip_ws(raw: &[u8], mut i: usize) -> usize {
    while matches!(raw.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// End (exclusive) of the JSON value starting at `i`, found without building it (strings are
/// skipped escape-aware, containers by depth); `None` when it does not end inside `raw`.
fn skip_value(raw: &[u8], i: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut j = i;
    loop {
        match *raw.get(j)? {
            b'"' => {
                j += 1;
                loop {
                    let k = j + raw
                        .get(j..)?
                        .iter()
                        .position(|&b| b == b'"' || b == b'\\')?;
                    if raw[k] == b'\\' {
                        j = k + 2;
                    } else {
                        j = k + 1;
                        break;
                    }
                }
            }
            b'{' | b'[' => {
                depth += 1;
                j += 1;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                j += 1;
            }
            _ if depth > 0 => j += 1,
            _ => {
                // a scalar at top level: up to the next delimiter
                while !matches!(
                    raw.get(j),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    j += 1;
                }
                return Some(j);
            }
        }
        if depth == 0 {
            return Some(j);
        }
    }
}

/// The decoded first (about) `max` bytes of a JSON string's raw inner bytes: cut before an
/// escape sequence or a UTF-8 sequence it would split, then decoded by serde_json.
fn string_prefix(inner: &[u8], max: usize) -> Result<String, WireError> {
    let mut cut = inner.len().min(max);
    // An escape is at most 12 bytes (a surrogate pair `\uD83D\uDE00`): never cut into one.
    let tail_from = cut.saturating_sub(12);
    if let Some(p) = inner[tail_from..cut].iter().rposition(|&b| b == b'\\') {
        cut = escape_start(inner, tail_from + p);
    }
    let mut tries = 0;
    loop {
        while cut > 0 && cut < inner.len() && (inner[cut] & 0xC0) == 0x80 {
            cut -= 1;
        }
        match unescape_json_str(&inner[..cut]) {
            Ok(s) => return Ok(s),
            // e.g. the cut split a surrogate pair: step back one more escape
            Err(_) if tries < 4 && cut > 0 => {
                tries += 1;
                let from = cut.saturating_sub(12);
                cut = match inner[from..cut].iter().rposition(|&b| b == b'\\') {
                    Some(p) => escape_start(inner, from + p),
                    None => from,
                };
            }
            Err(e) => return Err(e),
        }
    }
}

/// The inner bytes of a JSON string (no quotes) decoded into one allocation of at most their
/// size (escapes only shrink): what serde_json would return for it quoted, without building
/// the quoted copy first.
fn unescape_json_str(inner: &[u8]) -> Result<String, WireError> {
    let bad = || WireError::BadContent(0);
    if inner.iter().any(|&b| b < 0x20) {
        // raw control characters are not valid inside a JSON string
        return Err(bad());
    }
    let mut out: Vec<u8> = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let Some(off) = inner[i..].iter().position(|&b| b == b'\\') else {
            out.extend_from_slice(&inner[i..]);
            break;
        };
        out.extend_from_slice(&inner[i..i + off]);
        i += off;
        let esc = *inner.get(i + 1).ok_or_else(bad)?;
        i += 2;
        let c = match esc {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hex4 = |at: usize| -> Option<u32> {
                    let h = inner.get(at..at + 4)?;
                    u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
                };
                let hi = hex4(i).ok_or_else(bad)?;
                i += 4;
                if (0xD800..0xDC00).contains(&hi) {
                    if inner.get(i..i + 2) != Some(&b"\\u"[..]) {
                        return Err(bad());
                    }
                    let lo = hex4(i + 2).ok_or_else(bad)?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return Err(bad());
                    }
                    i += 6;
                    char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                        .ok_or_else(bad)?
                } else {
                    char::from_u32(hi).ok_or_else(bad)?
                }
            }
            _ => return Err(bad()),
        };
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// The start of the escape that the backslash at `q` belongs to: the first of a run of
/// backslashes, or the one before when the run has even length up to `q` (an escaped `\\`).
fn escape_start(inner: &[u8], q: usize) -> usize {
    let mut first = q;
    while first > 0 && inner[first - 1] == b'\\' {
        first -= 1;
    }
    // backslashes first..=q pair up from `first`: cutting at an even offset keeps pairs whole
    first + ((q - first) & !1)
}

/// nbclient's timestamp format.
pub fn format_timestamp(date: DateTime<Utc>) -> String {
    date.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn json_bytes(v: &Value) -> Vec<u8> {
    // Serialising a Value cannot fail (all keys are strings).
    serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec())
}

/// Non-object JSON parts (a misbehaving kernel) become `{}` so field lookups stay total.
fn object_or_empty(v: Value) -> Value {
    if v.is_object() {
        v
    } else {
        Value::Object(Map::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_verify() {
        let signer = Signer::new("secret");
        let msg = Message::new("execute_request", json!({"code": "1+1"}), "s1");
        let frames = msg.to_frames(&signer);
        let back = Message::from_frames(&frames, &signer).expect("decode");
        assert_eq!(back, msg);
        assert_eq!(back.msg_type(), "execute_request");
        assert!(back.date().is_some());

        let mut bad = frames.clone();
        bad[5] = b"{\"code\": \"2+2\"}".to_vec();
        assert!(matches!(
            Message::from_frames(&bad, &signer),
            Err(WireError::BadSignature)
        ));
        assert!(Message::from_frames(&frames, &Signer::new("other")).is_err());
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let signer = Signer::new("");
        let cases: Vec<Vec<Vec<u8>>> = vec![
            vec![],
            vec![b"x".to_vec()],
            vec![DELIMITER.to_vec()],
            vec![
                DELIMITER.to_vec(),
                b"".to_vec(),
                b"{".to_vec(),
                b"{}".to_vec(),
                b"{}".to_vec(),
                b"{}".to_vec(),
            ],
            vec![
                b"id".to_vec(),
                DELIMITER.to_vec(),
                b"zz".to_vec(),
                b"1".to_vec(),
                b"[]".to_vec(),
                b"null".to_vec(),
                b"\"s\"".to_vec(),
            ],
        ];
        for c in cases {
            let r = Message::from_frames(&c, &signer);
            if let Ok(m) = r {
                assert_eq!(m.msg_type(), "");
                assert!(m.parent_msg_id().is_none());
            }
        }
        assert!(!Signer::new("k").verify(&[b"a"], b"zz"));
        assert!(!Signer::new("k").verify(&[b"a"], b"abc"));
    }

    fn frames_with_content(content: &[u8], msg_type: &str) -> Vec<Vec<u8>> {
        let signer = Signer::new("k");
        let header = json_bytes(&json!({"msg_type": msg_type, "msg_id": "m1"}));
        let parts: [&[u8]; 4] = [&header, b"{}", b"{}", content];
        vec![
            DELIMITER.to_vec(),
            signer.sign(&parts).into_bytes(),
            header.clone(),
            b"{}".to_vec(),
            b"{}".to_vec(),
            content.to_vec(),
        ]
    }

    #[test]
    fn oversized_stream_keeps_a_prefix_and_says_so() {
        let text = format!("{}\n{}", "x".repeat(3000), "é".repeat(2000));
        let raw = json_bytes(&json!({"name": "stdout", "text": text}));
        let frames = frames_with_content(&raw, "stream");
        let m = Message::from_frames_capped(&frames, &Signer::new("k"), 1000).expect("decode");
        assert_eq!(m.content["name"], "stdout");
        let got = m.content["text"].as_str().expect("text");
        assert!(got.starts_with(&"x".repeat(990)), "{got}");
        assert!(got.contains("om-worker: stream text of"), "{got}");
        assert!(got.len() < 1200, "{}", got.len());
        // under the cap: decoded as it is
        let m = Message::from_frames_capped(&frames, &Signer::new("k"), raw.len()).expect("decode");
        assert_eq!(m.content["text"], Value::String(text));
    }

    #[test]
    fn oversized_display_data_is_replaced_by_a_notice() {
        let raw = json_bytes(&json!({
            "data": {"image/png": "A".repeat(200_000), "text/plain": "<Figure>"},
            "metadata": {"a": 1},
            "transient": {"display_id": "d1"},
            "execution_count": 3,
        }));
        let frames = frames_with_content(&raw, "execute_result");
        let m = Message::from_frames_capped(&frames, &Signer::new("k"), 100_000).expect("decode");
        let note = m.content["data"]["text/plain"].as_str().expect("notice");
        assert!(
            note.contains("omitted") && note.contains("execute_result data"),
            "{note}"
        );
        assert!(m.content["data"].get("image/png").is_none());
        assert_eq!(m.content["execution_count"], 3);
        assert_eq!(m.content["transient"]["display_id"], "d1");
        assert_eq!(m.content["metadata"]["a"], 1);
    }

    #[test]
    fn string_prefix_never_splits_escapes_or_chars() {
        // every cut position of a string full of escapes, surrogate pairs and multibyte chars
        let s = "a\\b\"c\n😀é\u{1}\\\\😀x".repeat(20);
        let raw = json_bytes(&Value::String(s.clone()));
        let inner = &raw[1..raw.len() - 1];
        for max in 0..inner.len() + 2 {
            let p = string_prefix(inner, max).expect("prefix decodes");
            assert!(s.starts_with(&p), "max {max}: {p:?}");
            // at most one escape (12 bytes) and one UTF-8 sequence (3) short of the raw bytes
            let kept = json_bytes(&Value::String(p.clone())).len() - 2;
            assert!(
                kept + 16 >= max.min(inner.len()),
                "max {max}: only {kept} bytes"
            );
        }
    }

    #[test]
    fn unescape_matches_serde_json() {
        for raw in [
            &br#"plain"#[..],
            br#"a\\b\"c\/d\b\f\n\r\t"#,
            br#"\u00e9\u0001\ud83d\ude00x"#,
            "ünï😀".as_bytes(),
            b"",
        ] {
            let mut quoted = b"\"".to_vec();
            quoted.extend_from_slice(raw);
            quoted.push(b'"');
            let want: String = serde_json::from_slice(&quoted).expect("valid");
            assert_eq!(unescape_json_str(raw).expect("decodes"), want);
        }
        for bad in [
            &br#"\"#[..],
            br#"\x"#,
            br#"\ud83d"#,
            br#"\ud83dx"#,
            br#"\ude00"#,
            br#"\u12"#,
            b"raw\x01",
            b"\xff",
        ] {
            assert!(
                unescape_json_str(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn oversized_garbage_is_an_error_not_a_panic() {
        let signer = Signer::new("k");
        for raw in [
            &b"[1,2,3]"[..],
            b"{\"text\": \"unterminated",
            b"{\"text\" 1}",
            b"{\"a\": {\"b\": [1, 2}",
            b"{",
            b"{\"a\": 1,",
            b"\"just a string\"",
        ] {
            let frames = frames_with_content(raw, "stream");
            let r = Message::from_frames_capped(&frames, &signer, 2);
            assert!(r.is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
        let frames = frames_with_content(b" { } ", "stream");
        let m = Message::from_frames_capped(&frames, &signer, 2).expect("empty object");
        assert_eq!(m.content, json!({}));
        let big_header = frames_with_content(b"{}", &"t".repeat(SMALL_VALUE));
        assert!(matches!(
            Message::from_frames_capped(&big_header, &signer, 50),
            Err(WireError::Oversized("header", _))
        ));
    }

    #[test]
    fn timestamp_format() {
        let m = Message {
            header: json!({"date": "2026-11-22T03:08:38.714992Z"}),
            parent_header: json!({}),
            metadata: json!({}),
            content: json!({}),
            buffers: vec![],
        };
        assert_eq!(m.nbclient_timestamp(), "2026-11-22T03:08:38.714992Z");
    }
}
