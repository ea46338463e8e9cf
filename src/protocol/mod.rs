//! The Celery/kombu wire protocol, as pure functions: bytes in, typed values out.
//!
//! Nothing here touches a socket (compare mini-redis's `frame.rs`): brokers hand
//! over a [`RawMessage`] (body bytes plus properties and headers, whatever the
//! transport), [`decode_task`] turns it into a [`TaskMessage`], and
//! [`result_codec`] encodes the [`ResultMeta`] the result backends store or
//! publish. Every decoder returns a [`DecodeError`] that names what was wrong;
//! none of them panics on any input.
//!
//! | module | what |
//! |---|---|
//! | [`value`] | the Python value model everything decodes into |
//! | [`pickle`] | safe allow-list pickle decoder (protocols 0–5) and a small encoder |
//! | [`json`] | JSON with kombu's `{"__type__", "__value__"}` wrappers |
//! | [`compression`] | the `compression` header (gzip/zlib, bz2 rejected clearly) |
//! | [`envelope`] | kombu's Redis envelope (base64 body, properties, delivery tag) |
//! | [`message`] | Celery protocol v2 and v1 → [`TaskMessage`] |
//! | [`result`] | result metadata (STARTED/SUCCESS/FAILURE/REVOKED) and exception payloads |
//! | [`result_codec`] | [`ResultMeta`] → the bytes/messages result backends write, per [`Serializer`] |
//! | [`typed_json`] | lossless typed JSON of a [`Value`], for a Python child process (never pickle) |

pub mod compression;
pub mod envelope;
pub mod json;
pub mod message;
pub mod pickle;
pub mod publish;
pub mod result;
pub mod result_codec;
pub mod typed_json;
pub mod value;

pub use message::{
    decode_body, decode_task, peek_task_id, peek_task_name, DecodeError, ErrorClass, Headers,
    Outgoing, RawMessage, TaskMessage,
};
pub use result::{ExceptionInfo, ResultMeta, State};
pub use result_codec::Serializer;
pub use value::{DataClass, DataObject, Value};
