//! Message properties: a lapin delivery → [`RawMessage`] and an
//! [`Outgoing`] → `BasicProperties`.
//!
//! The one place that knows which AMQP basic property carries which Celery
//! field (content type, correlation id = task id, reply_to, priority, …), so
//! consuming, broadcasts and publishing cannot drift apart.

use lapin::types::ShortString;
use lapin::BasicProperties;

use super::fields::{headers_to_table, table_to_headers};
use super::short;
use crate::broker::BrokerError;
use crate::protocol::{Outgoing, RawMessage};

/// A delivered message as the protocol layer sees it.
pub(super) fn to_raw_message(d: &lapin::message::Delivery) -> RawMessage {
    let p = &d.properties;
    let s = |v: &Option<ShortString>| v.as_ref().map(|x| x.as_str().to_owned());
    // Over the size limit: not copied, not decoded (a FAILURE for its id).
    let too_large = d.data.len() > crate::broker::MAX_MESSAGE_BYTES;
    RawMessage {
        body: if too_large {
            Vec::new()
        } else {
            d.data.clone()
        },
        content_type: s(p.content_type()),
        content_encoding: s(p.content_encoding()),
        headers: p
            .headers()
            .as_ref()
            .map(table_to_headers)
            .unwrap_or_default(),
        correlation_id: s(p.correlation_id()),
        reply_to: s(p.reply_to()),
        priority: *p.priority(),
        delivery_mode: *p.delivery_mode(),
        expiration: s(p.expiration()),
        redelivered: d.redelivered,
        exchange: d.exchange.as_str().to_owned(),
        routing_key: d.routing_key.as_str().to_owned(),
        transport_error: too_large.then(|| crate::broker::too_large(d.data.len())),
    }
}

/// The basic properties of a publish, with headers typed as py-amqp would.
pub(super) fn outgoing_properties(m: &Outgoing) -> Result<BasicProperties, BrokerError> {
    let mut p = BasicProperties::default()
        .with_content_type(short(&m.content_type)?)
        .with_content_encoding(short(&m.content_encoding)?)
        .with_delivery_mode(m.delivery_mode)
        .with_headers(headers_to_table(&m.headers)?);
    if let Some(c) = &m.correlation_id {
        p = p.with_correlation_id(short(c)?);
    }
    if let Some(r) = &m.reply_to {
        p = p.with_reply_to(short(r)?);
    }
    if let Some(pr) = m.priority {
        p = p.with_priority(pr);
    }
    if let Some(e) = &m.expiration {
        p = p.with_expiration(short(e)?);
    }
    Ok(p)
}
