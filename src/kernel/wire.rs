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
        Ok(Message {
            header: object_or_empty(serde_json::from_slice(parts[0])?),
            parent_header: object_or_empty(serde_json::from_slice(parts[1])?),
            metadata: object_or_empty(serde_json::from_slice(parts[2])?),
            content: object_or_empty(serde_json::from_slice(parts[3])?),
            buffers: rest[5..].iter().map(|b| b.as_ref().to_vec()).collect(),
        })
    }
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
